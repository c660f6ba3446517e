"""``covspec bench gpu``: check and time the Triton verifier against torch on a CUDA device.

A click command for the ``bench`` group. It needs a CUDA device and the ``triton``
package; without CUDA it says so and exits 1, unless ``--allow-cpu`` asks for the same
check on CPU in Triton's interpreter with tiny sizes (a test of the check itself, with
times that say nothing about the kernel). The report is printed as Markdown and written
as JSON to ``--out`` (and as Markdown beside it). Exit status 1 when the verifiers
disagree (a token differing away from a CDF boundary, or any accepted count).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from covspec.cli.values import positive_ints

CUDA_DEFAULTS = {"vocabs": "32000,151936", "batches": "1,8,64", "cases": 4, "repeats": 20}
CPU_DEFAULTS = {"vocabs": "64,300", "batches": "1,4", "cases": 1, "repeats": 2}


@click.command("gpu")
@click.option("--allow-cpu", is_flag=True,
              help="Without CUDA, run the check on CPU in Triton's interpreter (tiny sizes) instead of failing.")
@click.option("--vocabs", default=None, help="Comma-separated vocabulary sizes "
              f"[default: {CUDA_DEFAULTS['vocabs']} on CUDA, {CPU_DEFAULTS['vocabs']} on CPU].")
@click.option("--batches", default=None, help="Comma-separated batch sizes (sessions) "
              f"[default: {CUDA_DEFAULTS['batches']} on CUDA, {CPU_DEFAULTS['batches']} on CPU].")
@click.option("--modes", default="greedy,sampling,mixed", show_default=True,
              help="Comma-separated: greedy, sampling, mixed (half the sessions greedy).")
@click.option("--max-length", default=12, show_default=True, type=click.IntRange(min=1),
              help="Chunk lengths are drawn from 1..max-length per session.")
@click.option("--cases", default=None, type=click.IntRange(min=1),
              help=f"Random batches compared per setting [default: {CUDA_DEFAULTS['cases']} on CUDA, "
                   f"{CPU_DEFAULTS['cases']} on CPU].")
@click.option("--repeats", default=None, type=click.IntRange(min=1),
              help=f"Timed runs per verifier [default: {CUDA_DEFAULTS['repeats']} on CUDA, "
                   f"{CPU_DEFAULTS['repeats']} on CPU].")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--serve/--no-serve", default=None,
              help="Also serve the toy target (a short load run) and a tiny random LLaVA (a real device) with the "
                   "edge on this device [default: on CUDA only].")
@click.option("--out", default=Path("benchmarks/gpu.json"), show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The JSON report (Markdown goes beside it, .md).")
def gpu(allow_cpu: bool, vocabs: str | None, batches: str | None, modes: str, max_length: int,
        cases: int | None, repeats: int | None, seed: int, serve: bool | None, out: Path) -> None:
    """Check the fused Triton verifier against the torch one on random logits (greedy and
    sampling, chunk lengths 1..12, several batch sizes) and time both."""
    import torch

    if torch.cuda.is_available():
        device, defaults = torch.device("cuda"), CUDA_DEFAULTS
    elif allow_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")             # before triton compiles the kernel
        device, defaults = torch.device("cpu"), CPU_DEFAULTS
    else:
        raise click.ClickException("no CUDA device found (torch.cuda.is_available() is False); this check "
                                   "needs a CUDA GPU. --allow-cpu runs it on CPU in Triton's interpreter "
                                   "with tiny sizes, which tests the check, not the kernel's speed.")
    vocab_list = list(positive_ints(vocabs or defaults["vocabs"], "--vocabs"))
    batch_list = list(positive_ints(batches or defaults["batches"], "--batches"))
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    from covspec.bench.gpu import kernel as check
    from covspec.runtime_edge import verify_triton

    if not mode_list or set(mode_list) - set(check.MODES):
        raise click.BadParameter(f"{modes!r}: choose from {', '.join(check.MODES)}", param_hint="--modes")
    if verify_triton.triton is None:
        raise click.ClickException("the triton package is not installed (pip install triton)")
    if not verify_triton.kernel_available(device):
        raise click.ClickException("the Triton kernel was built for a GPU before TRITON_INTERPRET=1 was set: "
                                   "run with TRITON_INTERPRET=1 in the environment")
    report = {"meta": check.meta(device)}
    report["kernel"] = check.kernel_check(device, vocab_list, batch_list, mode_list, max_length=max_length,
                                          cases=cases or defaults["cases"], repeats=repeats or defaults["repeats"],
                                          seed=seed, progress=lambda line: click.echo(line, err=True))
    text = check.markdown(report)
    if serve if serve is not None else device.type == "cuda":
        import tempfile

        from covspec.bench.gpu import serve as gpu_serve

        click.echo("serving the toy target and a tiny LLaVA with the edge on " + device.type, err=True)
        with tempfile.TemporaryDirectory() as work:
            report["serve"] = gpu_serve.serve_check(device.type, Path(work))
        text += "\n\n" + gpu_serve.markdown(report["serve"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    click.echo(text)
    click.echo(f"report: {out} and {out.with_suffix('.md')}", err=True)
    if not report["kernel"]["ok"]:
        raise click.ClickException("the Triton kernel and the torch verifier disagree (see the table)")
    if "serve" in report and not (report["serve"]["tiny_llava"]["ok"]
                                  and all(p["all_correct"] for p in report["serve"]["toy_load"])):
        raise click.ClickException("an answer served from this device differs from the target's own (see above)")
