"""The `l4q` command: parse options, call the library, print. No logic lives here."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import re
import sys
from pathlib import Path

import click

from llama4_quant import __version__
from llama4_quant.errors import L4QError
from llama4_quant.formats.compressed_tensors import scheme_names
from llama4_quant.formats.gguf_types import FILE_TYPES, MMPROJ_TYPES

# Python's last garbage collections at exit would walk every object torch and numba made (about
# 0.4 s per run here), with nothing left to collect; exit handlers run before them.
atexit.register(gc.freeze)


@contextlib.contextmanager
def imports_uncollected():
    """Around the first import of torch: objects (about 240,000) that live to the end of the run.
    Collecting while they load ran three full passes (0.15 s); frozen afterwards, later full passes
    skip them (one on the walk's reader thread took 0.11 s, holding up every thread)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


# The choices come from the registries, which load without torch.
SCHEME_NAMES = scheme_names()
GGUF_FILE_TYPES = list(FILE_TYPES)


def one_line_errors(fn):
    """Turn the library's user-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except L4QError as exc:
            click.echo(f"l4q: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            hint = "; rerun with --resume to continue" if "resume" in kwargs else ""
            click.echo(f"l4q: interrupted{hint}", err=True)
            sys.exit(130)

    return wrapper


class L4QGroup(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line too, in l4q's format."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("l4q: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"l4q: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(0)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512 * 2**20, '1000' -> 1000 bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    unit, binary = (m.group(2) or "").upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    size = int(float(m.group(1)) * (1024 if binary else 1000) ** power)
    if size < 1:
        raise click.BadParameter(f"{text!r}: a size must be at least one byte")
    return size


def _size_option(_ctx, _param, value: str | None) -> int | None:
    return None if value is None else parse_size(value)


threads_option = click.option(
    "--threads", type=click.IntRange(min=1), help="CPU cores the kernels use [default: all available].")


def use_threads(threads: int | None) -> None:
    """--threads for the kernels; the heavy commands' first import of torch."""
    with imports_uncollected():
        from llama4_quant import parallel

        parallel.set_threads(threads)
        parallel.keep_freed_memory()


revision_option = click.option("--revision", help="For a Hub model: the branch, tag or commit [default: main].")


def hub_options(fn):
    """--prefetch, --keep-source and --revision: how a model that is not in the local Hugging Face cache
    streams from the Hub, for the commands that read it once in storage order."""
    fn = revision_option(fn)
    fn = click.option("--keep-source", is_flag=True, help="For a Hub model: keep the downloaded shards in the Hugging Face cache (by default each is deleted after its last read).")(fn)
    return click.option("--prefetch", default=1, show_default=True, type=click.IntRange(min=0), help="For a Hub model: shards downloaded ahead of the one being read (source on disk: prefetch + 1 shards).")(fn)


def mmproj_options(fn):
    """--mmproj and --mmproj-type: the vision tower and projector as llama.cpp's mmproj file too."""
    fn = click.option("--mmproj-type", default="F16", show_default=True, type=click.Choice(list(MMPROJ_TYPES)), help="Type of the mmproj's matrices.")(fn)
    return click.option("--mmproj", is_flag=True, help="Also write the vision tower and projector as llama.cpp's mmproj file (mmproj-<model>-<mmproj-type>.gguf), from the same read.")(fn)


def open_model(name: str, prefetch: int = 1, keep_source: bool = False, revision: str | None = None,
               quiet: bool = False):
    """Resolve and validate a model before anything heavy is imported: bad input fails in well under a second."""
    from llama4_quant.hub import HubOptions
    from llama4_quant.model import open_model as open_validated
    from llama4_quant.sources import resolve

    return open_validated(resolve(name, HubOptions(prefetch, keep_source, revision, show_progress=not quiet)))


def report_download(opened) -> None:
    """What a Hub run downloaded, and the most source it held on disk."""
    remote = opened.source.remote
    if remote is not None and remote.downloaded_bytes:
        where = "kept in the Hugging Face cache" if remote.kept else "each deleted after use"
        click.echo(f"downloaded {human_bytes(remote.downloaded_bytes)} from the Hub; at most "
                   f"{human_bytes(remote.peak_bytes)} of source shards on disk at once ({where})")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# The commands that run as a job of several processes under torchrun (see llama4_quant.distributed).
JOB_COMMANDS = ("calibrate", "quantize", "export")


@click.group(cls=L4QGroup)
@click.version_option(__version__, prog_name="l4q")
@click.pass_context
def main(ctx) -> None:
    """l4q: turn BF16 Llama 4 checkpoints into quantized derivatives."""
    from llama4_quant import distributed

    if distributed.is_distributed() and ctx.invoked_subcommand not in JOB_COMMANDS:
        raise click.UsageError(f"l4q {ctx.invoked_subcommand} runs in one process; only {', '.join(JOB_COMMANDS)} "
                               "run under torchrun")


def print_warnings(warnings: list[str]) -> None:
    from llama4_quant import distributed

    for warning in warnings if distributed.is_main() else []:  # once per job
        click.echo(f"l4q: warning: {warning}", err=True)


def join_job(quiet: bool) -> bool:
    """Under torchrun: join the job; only rank 0 prints. Returns whether this process stays quiet."""
    from llama4_quant import distributed

    distributed.init()
    return quiet or not distributed.is_main()


@main.command()
@click.option("--model", "model", required=True, help="Source: a model directory, a hub repo id, or a preset (tiny, tiny-maverick, scout, maverick).")
@click.option("--to", "schemes", multiple=True, type=click.Choice(SCHEME_NAMES), help="Compressed-tensors scheme. Repeatable, and with --gguf: every target is written from one read of the source.")
@click.option("--gguf", "gguf_types", multiple=True, type=click.Choice(GGUF_FILE_TYPES), help="Also write a GGUF file of this type from the same read. Repeatable.")
@click.option("--out", type=click.Path(path_type=Path), help="Output of a single target [default: <out-dir>/<model>-<scheme> or <model>-<type>.gguf].")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True, help="Where targets with default names go.")
@click.option("--method", default="rtn", show_default=True, type=click.Choice(["rtn", "mse", "gptq"]), help="For --to: rtn: absmax round-to-nearest; mse: searched scales (importance-weighted with --calib); gptq: GPTQ, needs --calib.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration statistics from `l4q calibrate`: for --method mse / gptq, and the importance matrix of --gguf targets.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_size_option, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--ignore", multiple=True, metavar="REGEX", help="Also keep matching Linear modules BF16 (regex matched from the start of the module name, e.g. '.*shared_expert.*'). Repeatable.")
@click.option("--quantize-attention", is_flag=True, help="Quantize self_attn too (kept BF16 by default: vLLM before 0.17.0 loads quantized Llama 4 attention wrong).")
@mmproj_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run: every target from its first unfinished shard or tensor.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (or discard interrupted ones).")
@click.option("--device", default="auto", show_default=True, help="Where the kernels run: auto, cpu, cuda, cuda:N.")
@threads_option
@hub_options
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@one_line_errors
def quantize(model, schemes, gguf_types, out, out_dir, method, calib, max_shard_size, ignore, quantize_attention, mmproj,
             mmproj_type, resume, overwrite, device, threads, prefetch, keep_source, revision, quiet):
    """Stream a BF16 Llama 4 checkpoint into compressed-tensors checkpoints (int4 / int8 / FP8) and GGUF
    files, all from one read."""
    schemes, gguf_types = list(dict.fromkeys(schemes)), list(dict.fromkeys(gguf_types))
    quiet = join_job(quiet)
    if out is not None and len(schemes) + len(gguf_types) > 1:
        raise click.UsageError("--out names one output; with several targets, use --out-dir")
    opened = open_model(model, prefetch, keep_source, revision, quiet)
    use_threads(threads)
    name = Path(opened.source.label).name
    scheme_outs = [(s, out or out_dir / f"{name}-{s}") for s in schemes]
    gguf_outs = [(t, out or out_dir / f"{name}-{t}.gguf") for t in gguf_types]
    vision = (mmproj_type, out_dir / f"mmproj-{name}-{mmproj_type}.gguf") if mmproj else None
    from llama4_quant.derive import derive

    done, read, warnings = derive(
        opened, scheme_outs, gguf_outs, method=method, calib=calib, ignore=ignore, quantize_attention=quantize_attention,
        max_shard_size=max_shard_size, resume=resume, overwrite=overwrite, device=device, mmproj=vision,
        show_progress=not quiet)
    print_warnings(warnings)
    if not quiet:
        for d in done:
            click.echo(f"wrote {d.out}: {d.what}, {human_bytes(d.source_bytes)} -> {human_bytes(d.output_bytes)}")
        if len(done) > 1:
            click.echo(f"read {human_bytes(read)} of the source once for {len(done)} outputs")
        report_download(opened)
    if quantize_attention and schemes:
        from llama4_quant.pipeline import QUANTIZED_ATTENTION_VLLM

        print_warnings([f"quantized attention loads correctly only in {QUANTIZED_ATTENTION_VLLM}"])


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The statistics directory to write.")
@click.option("--data", multiple=True, type=click.Path(path_type=Path), help="Text or .jsonl (field 'text') files [default: the built-in corpus's training split]. Repeatable.")
@click.option("--samples", default=128, show_default=True, type=click.IntRange(min=1), help="Calibration sequences.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2), help="Tokens per sequence.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its first unfinished layer.")
@click.option("--overwrite", is_flag=True, help="Replace existing statistics (or discard an interrupted run).")
@click.option("--json", "as_json", is_flag=True, help="Print stats.json instead of the summary.")
@threads_option
@revision_option
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@one_line_errors
def calibrate(model, out, data, samples, seq_len, device, resume, overwrite, as_json, threads, revision, quiet):
    """Collect per-expert routing and importance statistics, one decoder layer at a time."""
    from llama4_quant import distributed, outputs

    quiet = join_job(quiet)
    as_json = as_json and distributed.is_main()
    opened = open_model(model, revision=revision, quiet=quiet or as_json)
    use_threads(threads)
    outputs.check_output(out, opened.paths, resume=resume, overwrite=overwrite)  # before the minutes of tokenizing
    distributed.require_on_disk(opened)
    opened.fetch_all()
    from llama4_quant.calibrate.data import calibration_ids
    from llama4_quant.calibrate.stats import calibrate as run_calibration
    from llama4_quant.devices import resolve_device

    resolve_device(device)
    ids, description = calibration_ids(opened.dir, list(data) or None, samples, seq_len)
    result = run_calibration(opened, out, ids, description, device=device, resume=resume, overwrite=overwrite,
                             show_progress=not quiet and not as_json)
    if as_json:
        click.echo(json.dumps(result.stats, indent=1))
    elif not quiet:
        fallback = result.stats["all_token_experts"]
        click.echo(f"wrote {result.out}: {ids.numel()} tokens through {len(result.stats['moe_layers'])} MoE layers; "
                   f"{len(fallback)} experts had too few routed tokens and were calibrated on all tokens"
                   + (f" ({', '.join(fallback)})" if fallback else "") + f"; see {result.out / 'report.md'}")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check-values", is_flag=True, help="Also read every weight once and refuse NaN/Inf (reads the whole model; without it, headers only).")
@revision_option
@one_line_errors
def inspect(model, as_json, check_values, revision):
    """Summarize a Llama 4 checkpoint: architecture, tensors by role, predicted output sizes. A Hub model
    is inspected from its small files and shard headers, without downloading its weights."""
    opened = open_model(model, revision=revision, quiet=as_json)
    if check_values:
        opened.check_finite()
    from llama4_quant import inspection

    report = inspection.inspect(opened)
    click.echo(json.dumps(report, indent=2) if as_json else inspection.format_report(report))


@main.group()
def export():
    """Export a BF16 Llama 4 checkpoint to another runtime's format."""


@export.command("gguf")
@click.argument("model")
@click.option("--type", "ftype", default="Q4_K_M", show_default=True, type=click.Choice(GGUF_FILE_TYPES), help="GGUF file type.")
@click.option("--out", type=click.Path(path_type=Path), help="Output file [default: ./<model>-<type>.gguf].")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Calibration statistics from `l4q calibrate`: importance-weighted K-quant search.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE", help="As llama-quantize: tensors whose GGUF name matches REGEX get TYPE (the first match wins). Repeatable.")
@click.option("--output-tensor-type", metavar="TYPE", help="Type of output.weight.")
@click.option("--token-embedding-type", metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--target-size", callback=_size_option, help="Choose each tensor's block type to make the file this size (e.g. 40GB) with the least expected error; needs --imatrix.")
@click.option("--target-bpw", type=click.FloatRange(min=1.0, max=16.0), help="As --target-size, in bits per weight over all tensors.")
@mmproj_options
@click.option("--mmproj-out", type=click.Path(path_type=Path), help="mmproj output file [default: beside --out].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its first unfinished tensor.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--device", default="auto", show_default=True, help="Where the block encoders run: auto, cpu, cuda, cuda:N (the same bytes).")
@threads_option
@hub_options
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@one_line_errors
def export_gguf(model, ftype, out, imatrix, tensor_types, output_tensor_type, token_embedding_type, target_size,
                target_bpw, mmproj, mmproj_type, mmproj_out, resume, overwrite, device, threads, prefetch, keep_source, revision, quiet):
    """Write a GGUF file for llama.cpp straight from BF16 safetensors, in one streaming pass."""
    from llama4_quant.formats.gguf_types import parse_overrides

    overrides = parse_overrides(tensor_types, output_tensor_type, token_embedding_type)
    quiet = join_job(quiet)
    opened = open_model(model, prefetch, keep_source, revision, quiet)
    use_threads(threads)
    name = Path(opened.source.label).name
    out = out or Path(f"{name}-{ftype}.gguf")
    if mmproj_out is not None and not mmproj:
        raise click.UsageError("--mmproj-out applies with --mmproj")
    if target_size is not None and target_bpw is not None:
        raise click.UsageError("give --target-size or --target-bpw, not both")
    from llama4_quant.formats.gguf_budget import Budget

    budget = Budget(target_size, target_bpw) if target_size is not None or target_bpw is not None else None
    vision = (mmproj_type, mmproj_out or out.parent / f"mmproj-{name}-{mmproj_type}.gguf") if mmproj else None
    from llama4_quant.derive import derive

    done, _, warnings = derive(opened, [], [(ftype, out)], calib=imatrix, resume=resume, overwrite=overwrite,
                               device=device, gguf_overrides=overrides, mmproj=vision, gguf_budget=budget,
                               show_progress=not quiet)
    print_warnings(warnings)
    if not quiet:
        for d in done:
            click.echo(f"wrote {d.out}: {d.what}, {human_bytes(d.source_bytes)} -> {human_bytes(d.output_bytes)}")
        report_download(opened)


@main.command("eval")
@click.option("--base", required=True, help="The BF16 source: directory, hub repo id or preset.")
@click.option("--candidate", "candidates", multiple=True, required=True, type=click.Path(path_type=Path), help="A compressed-tensors directory or a .gguf file. Repeatable.")
@click.option("--data", multiple=True, type=click.Path(path_type=Path), help="Text or .jsonl (field 'text') files [default: the tiny models' held-out text]. Repeatable.")
@click.option("--ctx", type=click.IntRange(min=2), help="Window length in tokens [default: twice the attention chunk].")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32768, show_default=True, help="Evaluate at most this many tokens.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=Path("l4q-report"), show_default=True, help="Where report.json, report.md, report.html and the plots go.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "transformers", "streaming"]), help="How safetensors models run: transformers, or the layer-streaming engine (one decoder layer in memory); auto streams models that do not fit.")
@click.option("--batch-windows", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per pass of the streaming engine (each pass reads every layer once).")
@revision_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def eval_command(base, candidates, data, ctx, max_tokens, report_dir, device, engine, batch_windows, revision, quiet):
    """Perplexity drift, KL divergence, top-token and routing agreement of derivatives against their base."""
    from llama4_quant import outputs

    opened = open_model(base, revision=revision, quiet=quiet)
    report_dir = outputs.check_writable_dir(report_dir)
    opened.fetch_all()
    from llama4_quant import evaluate, report
    from llama4_quant.devices import resolve_device

    result = evaluate.evaluate(
        opened, list(candidates), data=list(data) or None, ctx=ctx, max_tokens=max_tokens,
        device=str(resolve_device(device)), engine=engine, batch_windows=batch_windows,
        cache_dir=report_dir / ".cache", progress=not quiet,
    )
    with outputs.writing(report_dir):
        paths = report.write_reports(result, report_dir)
    click.echo(report.summary_table_markdown(result))
    if not quiet:
        click.echo(f"report: {paths['html']}")


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--against", "against", multiple=True, type=click.Path(path_type=Path), help="What is already stored: a model directory or file (e.g. the BF16 base). Repeatable.")
@click.option("--store", type=click.Path(path_type=Path), help="The on-disk Xet store [default: ~/.cache/l4q/xet-store].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def dedup(target, against, store, as_json, quiet):
    """What uploading TARGET to Xet storage would store, with --against (and the store) already stored."""
    from llama4_quant.model import check_derivative
    from llama4_quant.xet import dedup as xet_dedup

    check_derivative(target)
    report = xet_dedup.measure(target, list(against), store, show_progress=not (as_json or quiet))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
        return
    click.echo(f"{report.target} against {', '.join(report.against) or 'the store only'} (store {report.store})")
    click.echo("| file | size | new | deduped | dedup |\n|---|---:|---:|---:|---:|")
    for f in report.files:
        click.echo(f"| {f.name} | {human_bytes(f.size)} | {human_bytes(f.new_bytes)} | {human_bytes(f.deduped_bytes)} | {f.dedup:.1%} |")
    click.echo(f"| total | {human_bytes(report.size)} | {human_bytes(report.new_bytes)} | "
               f"{human_bytes(report.size - report.new_bytes)} | {report.dedup:.1%} |")


@main.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--repo", required=True, help="The Hub repo to publish to, user/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to commit to (created if missing) [default: main].")
@click.option("--commit-message", help="Commit message.")
@click.option("--base-model", help="Hub repo id of the base model for the card [default: from the derivative's own files].")
@click.option("--against", "against", multiple=True, type=click.Path(path_type=Path), help="Measure the dedup estimate against this (e.g. the local BF16 base). Repeatable.")
@click.option("--store", type=click.Path(path_type=Path), help="The on-disk Xet store for the estimate [default: ~/.cache/l4q/xet-store].")
@click.option("--dry-run", is_flag=True, help="Print the plan and the dedup estimate; no network.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def push(target, repo, private, revision, commit_message, base_model, against, store, dry_run, quiet):
    """Publish a derivative (directory or .gguf) with a model card, through Xet storage."""
    from llama4_quant.xet import dedup as xet_dedup
    from llama4_quant.xet import push as xet_push

    token = None if dry_run else xet_push.resolve_token()  # fail fast, before any measuring
    options = dict(revision=revision, private=private, commit_message=commit_message, base_model=base_model)
    plan = xet_push.plan_push(target, repo, **options)  # checks the inputs before the measuring
    against = list(against) or xet_push.recorded_base(target)
    estimate = None
    if dry_run or against:
        estimate = xet_dedup.measure(target, against, store, show_progress=not quiet).to_json()
        plan = xet_push.plan_push(target, repo, **options, dedup=estimate)
    click.echo(xet_push.format_plan(plan, estimate))
    if dry_run:
        click.echo("dry run: nothing was sent")
        return
    url = xet_push.push(plan, token)
    click.echo(f"pushed: {url}")


if __name__ == "__main__":
    main()
