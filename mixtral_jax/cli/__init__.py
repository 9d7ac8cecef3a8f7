"""The command line: the `mixtral-jax` dispatcher (main.py), whose subcommands the applications register
through entry points, and the library's own `generate` command."""
