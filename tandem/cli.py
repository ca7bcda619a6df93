"""`tandem` command line: generate (more commands arrive with the cluster)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tandem.log import setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: disaggregated LLM inference.")


@app.callback()
def _root(log_level: Annotated[str, typer.Option(help="Logging level.")] = "WARNING") -> None:
    setup_logging(log_level)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = False,
    model: Annotated[str | None, typer.Option(help="HF directory or .gguf file.")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 | float32 | float16.")] = "bfloat16",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Complete PROMPT with the model and print only the completion."""
    from tandem.engine.errors import EngineError
    from tandem.engine.llm import LLM
    from tandem.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        llm = LLM(model=model, dtype=dtype, num_threads=threads)
        if chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate(prompt, params)[0]
    except (ValueError, EngineError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    sys.stdout.write(out.text + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
