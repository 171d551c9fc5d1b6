"""Control twins, experiments, `karn compare` and `karn report` as a user runs them, and the
report opened in a real headless Chromium."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from karn_otel import collector as kc
from karn_otel.config import KarnConfig
from karn_otel.contracts import EpisodeContext, HostSnapshot, Scalars
from karn_otel.experiment.report import SECTIONS_RUN
from karn_otel.experiment.runner import MANIFEST
from karn_otel.reference.trainer import ReferenceTrainer, RunConfig
from karn_otel.sinks import MemorySink
from karn_otel.sinks.runlog import read_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def karn(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "karn_otel.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_control_twin_starts_from_the_same_weights_and_batches():
    morph = ReferenceTrainer(RunConfig(epochs=3, seed=4))
    twin = ReferenceTrainer(RunConfig(epochs=3, seed=4, controller="none"))
    a, b = morph.model.state_dict(), twin.model.state_dict()
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert bool((morph.data.x_train == twin.data.x_train).all()) and bool(
        (morph.data.y_train == twin.data.y_train).all()
    )


def _losses(cfg: RunConfig) -> list[tuple[float, float]]:
    sink = MemorySink()
    kc.configure(KarnConfig(out_dir=None, console="off"), sinks=[sink], processors=False)
    try:
        ReferenceTrainer(cfg).run()
    finally:
        kc.shutdown()
    return [(e.payload.train_loss, e.payload.val_accuracy) for e in sink.events if isinstance(e.payload, HostSnapshot)]


def test_without_germination_morph_and_control_are_identical():
    """Warm-up keeps the heuristic from germinating in the first epochs: every loss (which
    depends on the weights and on the order of every batch) must then be equal, bit for bit."""
    cfg = RunConfig(epochs=2, seed=5, warmup_epochs=5)
    assert _losses(cfg) == _losses(dataclasses.replace(cfg, controller="none"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp")
    p = karn("run", "--seeds", "0,1", "--control", "--epochs", "3", "--out", str(out), "--experiment", "e", "--no-live")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "experiment dir:" in p.stdout
    # the morph runs' console shows both numbers, labelled apart; the control runs only removal
    morph_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[karn] epoch") and "vs control (causal)" in ln]
    assert len(morph_lines) == 2 * 3 and all("vs host-only removal" in ln for ln in morph_lines)
    return out / "e"


def test_experiment_dir_manifest_and_links(experiment):
    manifest = json.loads((experiment / MANIFEST).read_text())
    assert [(r["seed"], r["arm"], r["status"]) for r in manifest["runs"]] == [
        (0, "control", "done"), (0, "morph", "done"), (1, "control", "done"), (1, "morph", "done"),
    ]  # fmt: skip
    for r in manifest["runs"]:
        rec = read_run(experiment / r["run_id"])
        ctx = next(e.payload for e in rec.events if isinstance(e.payload, EpisodeContext))
        assert ctx.experiment_id == "e" and ctx.experiment_arm == r["arm"]
        assert ctx.hyperparameters["controller"] == ("none" if r["arm"] == "control" else "heuristic")
    # the morph run records its twin's accuracy epoch by epoch, beside its own
    morph, twin = read_run(experiment / "e-s1-morph"), read_run(experiment / "e-s1-control")
    twin_acc = [e.payload.val_accuracy for e in twin.events if isinstance(e.payload, HostSnapshot)]
    recorded = [e.payload.values["control_val_accuracy"] for e in morph.events if isinstance(e.payload, Scalars)]
    assert recorded == twin_acc and len(recorded) == 3
    shown = karn("inspect", str(experiment / "e-s1-morph")).stdout
    assert "experiment e (morph)" in shown and "task classification; software: python" in shown


def test_resume_reruns_only_what_did_not_finish(experiment, tmp_path):
    exp = tmp_path / "e"
    shutil.copytree(experiment, exp)
    manifest = json.loads((exp / MANIFEST).read_text())
    manifest["runs"][-1]["status"] = "running"  # as a kill during the last run leaves it
    (exp / MANIFEST).write_text(json.dumps(manifest))
    p = karn(
        "run", "--seeds", "0,1", "--control", "--epochs", "3", "--out", str(tmp_path), "--experiment", "e", "--no-live"
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("done earlier") == 3 and "resuming" in p.stdout
    after = json.loads((exp / MANIFEST).read_text())["runs"][-1]
    assert after["status"] == "done" and after["attempts"] == ["e-s1-morph"] and after["run_id"] == "e-s1-morph-r1"
    p = karn("run", "--seeds", "0,1,2", "--control", "--epochs", "3", "--out", str(tmp_path), "--experiment", "e")
    assert p.returncode == 2 and "resume it with the same options" in p.stderr


def test_compare_json_and_table(experiment):
    p = karn("compare", str(experiment), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["a"]["label"] == "morph" and len(res["a"]["runs"]) == 2 and len(res["b"]["runs"]) == 2
    kinds = {r["quantity"]: r["kind"] for r in res["results"]}
    assert kinds["final val accuracy"] == "Comparison"
    assert "accuracy delta vs control (causal), paired by seed" in kinds
    assert "accuracy delta vs host-only removal (not causal)" in kinds
    p = karn("compare", str(experiment))
    assert "Welch p" in p.stdout and "Hedges' g" in p.stdout and "IQM" in p.stdout
    p = karn("compare", str(experiment / "e-s0-morph"))
    assert "not enough runs" in p.stdout and "no control runs" in p.stdout


def test_compare_calls_a_delta_causal_only_when_the_pairs_differ_in_nothing_but_the_arm(experiment, tmp_path):
    """`--baseline` runs trained for fewer epochs share seeds with the morph runs but are not
    their control: the delta is labelled not causal and the difference is named."""
    morph = [str(experiment / f"e-s{s}-morph") for s in (0, 1)]
    twins = [str(experiment / f"e-s{s}-control") for s in (0, 1)]

    def delta_rows(*args):
        p = karn("compare", *morph, "--baseline", *args, "--json")
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        return [r["quantity"] for r in res["results"] if r["quantity"].startswith("accuracy delta vs baseline")], res[
            "notes"
        ]

    rows, notes = delta_rows(*twins)
    assert rows == ["accuracy delta vs baseline (causal), paired by seed"], rows
    assert not any("differ in hyperparameters" in n for n in notes), notes
    p = karn(
        "run", "--seeds", "0,1", "--epochs", "2", "--controller", "none", "--out", str(tmp_path), "--experiment", "short",
        "--no-live",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    short = [str(tmp_path / "short" / f"short-s{s}-morph") for s in (0, 1)]
    rows, notes = delta_rows(*short)
    assert rows == ["accuracy delta vs baseline, paired by seed (not causal: the pairs differ in more than the arm)"]
    (note,) = [n for n in notes if "differ in hyperparameters" in n]
    assert "epochs (2 of 2)" in note and "controller" not in note, note
    shown = karn("compare", *morph, "--baseline", *short).stdout
    assert "(causal)" not in shown and "not causal: the pairs differ" in shown and "epochs (2 of 2)" in shown
    rows, _ = delta_rows(*short, "--treatment", "epochs")
    assert rows == ["accuracy delta vs baseline (causal), paired by seed"], "the named treatment may differ"


def _chromium(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    assert CHROMIUM
    return subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
         *extra, url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _open_in_browser(report: Path, tmp: Path) -> tuple[str, list[str]]:
    if CHROMIUM is None:
        pytest.skip("chromium not installed; scripts/install-system-deps.sh installs it (Debian package chromium)")
    p = _chromium(report.as_uri(), tmp, "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    console = [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]
    shot = Path(__file__).resolve().parents[2] / "test-artifacts" / f"{report.stem}.png"
    shot.parent.mkdir(exist_ok=True)
    _chromium(report.as_uri(), tmp, f"--screenshot={shot}", "--window-size=1000,4000")
    assert shot.stat().st_size > 10_000
    return p.stdout, console


def test_report_of_a_run_renders_every_section(tmp_path, experiment):
    run = experiment / "e-s0-morph"
    out = tmp_path / "run-report.html"
    p = karn("report", str(run), "-o", str(out))
    assert p.returncode == 0, p.stderr
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    dom, console = _open_in_browser(out, tmp_path)
    assert console == [], console
    expected = [s for s in SECTIONS_RUN if s != "ppo"]  # the heuristic controller: no PPO section
    for sid in expected:
        assert re.search(rf'<section id="{sid}" data-rendered="yes"', dom), f"section {sid} missing or not rendered"
    assert 'id="ppo"' not in dom


def test_report_of_a_ppo_run_has_ppo_health_and_names_the_episode_it_shows(tmp_path):
    """Two episodes: every section renders, and the title says the report is the last one's."""
    p = karn(
        "run", "--epochs", "3", "--controller", "ppo", "--episodes", "2", "--out", str(tmp_path), "--no-live"
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    run = next(d for d in tmp_path.iterdir() if d.is_dir())
    out = tmp_path / "ppo.html"
    assert karn("report", str(run), "-o", str(out)).returncode == 0
    dom, console = _open_in_browser(out, tmp_path)
    assert console == []
    for sid in SECTIONS_RUN:
        assert re.search(rf'<section id="{sid}" data-rendered="yes"', dom), sid
    assert f"Karn report — run {run.name}, episode 2 of 2 (the last" in dom


def test_report_of_an_experiment_overlays_runs_and_compares(tmp_path, experiment):
    out = tmp_path / "exp-report.html"
    p = karn("report", str(experiment), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "read 4/4 runs" in p.stderr  # progress on long work
    dom, console = _open_in_browser(out, tmp_path)
    assert console == []
    for sid in ("runs", "compare", "run-1", "run-4"):
        assert re.search(rf'<section id="{sid}" data-rendered="yes"', dom), sid
    assert "Welch p" in dom


def test_summary_and_report_of_a_multi_rank_log_keep_its_reduced_matrices(tmp_path):
    """Rank 0's log of a --nproc run holds its own host snapshots and the job-wide (reduced)
    ones, and the counterfactual matrices only reduced: compare and report read the job's
    view (before, every reduced event was dropped and a DDP run showed no Shapley values)."""
    from karn_otel.contracts import CounterfactualMatrix, CounterfactualResult, EpisodeSummary, ShapleyEstimate
    from karn_otel.experiment.report import _last_episode
    from karn_otel.experiment.summary import summarise
    from karn_otel.sinks.runlog import RunLogSink
    from tests.conftest import make_context

    c = kc.KarnCollector(KarnConfig(out_dir=None, console="off", strict=True, run_id="ddp"))
    c.add_sink(RunLogSink(tmp_path, "ddp"))
    c.emit(make_context(slots=("mid",)))
    for epoch, (own, job) in enumerate([(0.70, 0.72), (0.80, 0.83)], start=1):
        c.emit(HostSnapshot(epoch, 1.0, 0.5, 1.1, own, 100, 10, 110, 0, 0.5, {}, None))  # rank 0's own
        c.emit(HostSnapshot(epoch, 1.0, 0.5, 1.1, job, 100, 10, 110, 0, 0.5, {}, None), is_reduced=True)
        matrix = CounterfactualMatrix(
            epoch=epoch,
            slot_ids=("mid",),
            configs=(
                CounterfactualResult((True,), {"mid": 1.0}, 0.3, job),
                CounterfactualResult((False,), {"mid": 0.0}, 0.4, job - 0.05),
            ),
            marginal_contributions={"mid": 0.05},
            interaction_effects={},
            shapley_values={"mid": ShapleyEstimate(0.05, 0.01, 2, "exact", 0.03, 0.07)},
        )
        c.emit(matrix, is_reduced=True)  # the matrices exist only reduced
    c.emit(EpisodeSummary(2, 0.83, 0.78, 0.78, 100, 110, 0, 1.0))
    c.close()
    rec = read_run(tmp_path / "ddp")
    s = summarise(rec)
    assert s.final_shapley["mid"].mean == pytest.approx(0.05) and s.final_shapley_epoch == 2
    assert [p.val_accuracy for p in s.curve] == [0.72, 0.83], "the job-wide snapshots, not rank 0's own"
    assert [p.removal_accuracy for p in s.curve] == pytest.approx([0.67, 0.78])
    kinds = [type(ev.payload).__name__ for ev in _last_episode(rec)]
    assert kinds.count("CounterfactualMatrix") == 2 and kinds.count("HostSnapshot") == 2


def test_compare_claims_only_what_the_final_matrix_says(tmp_path):
    """A seed that looked strong at epoch 1 and was culled before the last epoch: the run's own
    final verdict reads the last matrix (no Shapley value for it), and so must compare."""
    import karn_otel
    from karn_otel.contracts import CounterfactualMatrix, CounterfactualResult, ShapleyEstimate
    from karn_otel.experiment.compare import compare_runs
    from karn_otel.experiment.summary import load

    strong = ShapleyEstimate(0.2, 0.01, 1, "exact_enumeration", 0.18, 0.22)
    for k in range(2):
        run = karn_otel.init(config={"seed": k}, out_dir=tmp_path, slots={"mid": 10}, console="off", max_epochs=2)
        run.emit(
            CounterfactualMatrix(
                epoch=1,
                slot_ids=("mid",),
                configs=(
                    CounterfactualResult((True,), {"mid": 1.0}, 0.3, 0.9),
                    CounterfactualResult((False,), {"mid": 0.0}, 0.5, 0.7),
                ),
                marginal_contributions={"mid": 0.2},
                interaction_effects={},
                shapley_values={"mid": strong},
            )
        )
        run.log({"train_loss": 0.3, "val_loss": 0.3, "val_accuracy": 0.9}, epoch=1)
        run.emit(  # epoch 2: the seed is gone, the matrix has no slot
            CounterfactualMatrix(
                epoch=2,
                slot_ids=(),
                configs=(CounterfactualResult((), {}, 0.4, 0.8),),
                marginal_contributions={},
                interaction_effects={},
                shapley_values={},
            )
        )
        run.log({"train_loss": 0.4, "val_loss": 0.4, "val_accuracy": 0.8}, epoch=2)
        assert run.collector.pipeline.view.analytics.claims() == {}, "the run itself claims nothing at the end"
        run.finish()
    runs = [load(d) for d in sorted(tmp_path.iterdir()) if d.is_dir()]
    assert len(runs) == 2 and all(r.final_shapley == {} and r.final_shapley_epoch == 2 for r in runs)
    assert compare_runs(runs).slots == [], "no run's final verdict claims mid"
