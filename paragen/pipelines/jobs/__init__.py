"""Command-line jobs (`paragen image`, `video`, `llm`): each checks a request before the process group and
runs it after; `paragen.launch.cli` drives them through one lifecycle (see `paragen.pipelines.registry`)."""
