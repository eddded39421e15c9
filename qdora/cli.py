"""The `qdora` command line: thin click wrappers; the work lives in the modules they call."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdora")
def main() -> None:
    """Fine-tune LLMs with QDoRA on a frozen NF4 base, then merge and export for llama.cpp/Ollama."""


if __name__ == "__main__":
    main()
