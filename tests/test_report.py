"""report.html: written by every pipeline run, self-contained, escaped, rendered by headless Chromium; plots that
fail (or a missing matplotlib) are noted instead of failing the run; `segprune report` over several runs."""

import base64
import copy
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from segprune import checkpoint
from segprune.cli import main
from segprune.prune import channel_groups
from segprune.report import html, plots
from segprune.report.combined import combined_report
from segprune.report.common import read_curves
from segprune.report.environment import environment
from segprune.report.model import write_model_report
from segprune.report.run import write_report
from segprune.workflows import recipe_from, run, tasks
from segprune.workflows.compress import layer_widths

TINY = dict(model="test_pspnet", width=1 / 32, train_samples=8, val_samples=4, batch_size=4, epochs=1,
            finetune_epochs=1, size=[32, 48], threads=1, latency_rounds=1, latency_runs=1)
IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]*)"')
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_run(out, **overrides):
    return run(recipe_from(None, {**TINY, **overrides}), out, progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "run"
    tiny_run(out)
    return out


def fake_report(title="fake run", miou=(0.5, 0.45), macs=(2e6, 1e6), latency=(2.0, 1.2), **extra):
    setup = dict(device="cpu", dtype="float32", batch=1, input_size=[32, 32], threads=1, rounds=1)
    side = [dict(miou=miou[k], params=1000 - 400 * k, macs=macs[k], size_bytes=4000 - 1600 * k,
                 latency_ms=latency[k], latency=setup) for k in (0, 1)]
    return {"title": title, "before": side[0], "after": side[1], "widths": {"conv1": [8, 4], "conv2": [16, 12]},
            "notes": ["a note"], **extra}


def image_sources(page: str) -> list[str]:
    return IMG_SRC.findall(page)


def test_pipeline_writes_a_self_contained_html_report(run_dir):
    page = (run_dir / "report.html").read_text()
    sources = image_sources(page)
    # accuracy vs MACs and vs latency, channel widths, training curves (train and fine-tune), 3 validation images
    assert len(sources) == 2 + 1 + 1 + 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG) and b"http" not in png
    for external in ("http://", "https://", "<link", "<script", "url(", "@import"):
        assert external not in page
    assert page.count("<tr>") >= 5 and "mIoU (%)" in page and "after / before" in page
    assert "skipped" not in page


def test_widths_are_read_from_the_unpruned_and_pruned_models(run_dir):
    widths = json.loads((run_dir / "report.json").read_text())["widths"]
    pruned = dict(checkpoint.load(run_dir / "pruned").named_modules())
    assert widths and all(pruned[name].out_channels == after for name, (_, after) in widths.items())
    assert all(0 < after <= before for before, after in widths.values())
    assert any(after < before for before, after in widths.values())


def test_a_failing_plot_is_noted_and_the_run_finishes(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("widths plot exploded")

    def no_predictions(*args, **kwargs):
        raise RuntimeError("predictions exploded")

    monkeypatch.setattr(plots, "widths", boom)
    monkeypatch.setattr(tasks, "sample_predictions", no_predictions)
    report = tiny_run(tmp_path / "run")
    notes = ["plot channel widths before and after skipped: RuntimeError: widths plot exploded",
             "plot validation predictions skipped: RuntimeError: predictions exploded"]
    for name in ("report.html", "report.md", "report.json"):
        assert all(note in (tmp_path / "run" / name).read_text() for note in notes)
    assert report["after"]["macs"] < report["before"]["macs"]
    assert len(image_sources((tmp_path / "run" / "report.html").read_text())) == 3  # the others still drawn


def test_widths_of_a_bypassed_layer_are_zero():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    groups = channel_groups(model, torch.zeros(1, 3, 8, 8))
    after = copy.deepcopy(model)
    after[0] = nn.Conv2d(3, 5, 3, padding=1)
    assert layer_widths(model, after, groups) == {"0": [8, 5]}  # "3" produces the output: not prunable
    after[0] = nn.Identity()
    assert layer_widths(model, after, groups) == {"0": [8, 0]}


def test_a_failing_page_section_still_writes_all_three_files(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("table exploded")

    monkeypatch.setattr(html, "table", boom)
    skipped = write_report(tmp_path, fake_report())
    assert skipped == ["report.html incomplete: KeyError: 'table exploded'"]
    assert "table exploded" in (tmp_path / "report.html").read_text()
    assert "| mIoU (%) | 50.00 | 45.00 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["notes"][-1] == skipped[0]


def test_without_matplotlib_the_report_is_written_with_notes(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    skipped = write_report(tmp_path, fake_report())
    assert skipped == [f"plot {name} skipped: matplotlib not installed (pip install segprune[report])"
                       for name in ("accuracy vs MACs", "accuracy vs measured latency",
                                    "channel widths before and after")]
    page = (tmp_path / "report.html").read_text()
    assert image_sources(page) == [] and "pip install segprune[report]" in page
    assert "45.00" in page  # the table is there
    assert json.loads((tmp_path / "report.json").read_text())["notes"][-3:] == skipped


def test_user_strings_are_escaped(tmp_path):
    evil = '<script>alert("x")</script> & <b> $\\frac{$'  # and broken mathtext, which matplotlib must not parse
    report = fake_report(title=evil, notes=[evil], recipe={"name": evil},
                         widths={"<img src=x onerror=alert(1)>": [4, 2]})
    write_report(tmp_path, report)
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page and "<b>" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt; $\\frac{$") >= 3
    assert len(image_sources(page)) == 3


def test_colours_are_fixed_and_ignored_pixels_black():
    labels = np.array([[0, 1], [255, 30]])
    rgb = plots.colourise(labels, num_classes=31)
    assert (rgb[0, 0] == plots.PALETTE[0]).all() and (rgb[0, 1] == plots.PALETTE[1]).all()
    assert (rgb[1, 0] == 0).all() and (rgb[1, 1] == plots.palette(31)[30]).all()
    assert (plots.palette(31) == plots.palette(31)).all()
    mixed = plots.overlay(np.full((2, 2, 3), 200, np.uint8), labels, 31)
    assert (mixed[1, 0] == 0).all() and (mixed[0, 0] != 0).any()
    rng = np.random.default_rng(0)
    png = plots.prediction_panel(rng.normal(size=(3, 8, 8)), *rng.integers(0, 3, size=(3, 8, 8)), num_classes=3,
                                 class_names=["a", "$\\frac{$", "c"])
    assert png.startswith(b"\x89PNG")


def test_pareto_front_keeps_the_undominated_points():
    points = [(10, 50), (5, 40), (5, 45), (20, 50), (1, 10), (12, 60)]  # (cost, accuracy)
    assert plots.pareto_front(points) == [4, 2, 0, 5]


def test_report_command_combines_runs(run_dir, tmp_path, capsys):
    other = tmp_path / "other $\\frac{$"  # the run's name goes into a plot legend: no mathtext
    other.mkdir()
    write_report(other, fake_report(title="other & more"))
    out = tmp_path / "combined"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert len(image_sources(page)) == 2 + 2 and "other &amp; more" in page  # Pareto plots, widths of each run
    assert page.count("<tr>") == 1 + 2 + 1 + 2  # header + a row per run, in both tables
    combined = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in combined["runs"]] == ["run", other.name]
    assert "| run | test_pspnet | slimming |" in (out / "report.md").read_text()

    before = page
    assert main(["report", str(run_dir), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.html").read_text() == before
    assert main(["report", str(run_dir), "--out", str(out), "--force"]) == 0
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 1


def test_report_command_names_bad_folders(tmp_path, capsys):
    empty, broken, partial = tmp_path / "empty", tmp_path / "broken", tmp_path / "partial"
    for folder in (empty, broken, partial):
        folder.mkdir()
    (broken / "report.json").write_text('{"title": "cut off", "bef')
    report = fake_report()
    del report["after"]["macs"]
    (partial / "report.json").write_text(json.dumps(report))
    out = tmp_path / "out"
    cases = ((empty, "no report.json"), (broken, "not valid JSON"), (partial, "'after' lacks numeric macs"),
             (tmp_path / "missing", "no such run folder"))
    for folder, message in cases:
        assert main(["report", str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(folder) in err
    assert not out.exists()
    good = tmp_path / "good"
    good.mkdir()
    write_report(good, fake_report())
    with pytest.raises(ValueError, match="is one of the run folders"):
        combined_report([good], good)


def instance_report(title, mask_ap=(0.30, 0.28)):
    report = fake_report(title=title, task="instance")
    for side, ap in zip(("before", "after"), mask_ap):
        report[side].pop("miou")
        report[side].update(box_ap=ap + 0.05, mask_ap=ap, mask_ap50=ap + 0.2, mask_ap75=ap - 0.05)
    return report


def test_instance_runs_combine_on_mask_ap_and_never_with_semantic_runs(run_dir, tmp_path, capsys):
    folders = [tmp_path / "yolact_a", tmp_path / "yolact_b"]
    for folder, ap in zip(folders, [(0.30, 0.28), (0.30, 0.21)]):
        folder.mkdir()
        write_report(folder, instance_report(folder.name, ap))
    out = tmp_path / "combined"
    assert main(["report", *map(str, folders), "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "mask AP before (%) | mask AP after (%)" in table and "| yolact_b | ? | ? | 30.00 | 21.00 |" in table
    assert json.loads((out / "report.json").read_text())["accuracy"] == "mask_ap"
    assert len(image_sources((out / "report.html").read_text())) == 2 + 2
    assert main(["report", str(run_dir), str(folders[0]), "--out", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert "different accuracies" in err and "yolact_a (mask AP)" in err and "(mIoU)" in err
    assert not (tmp_path / "mixed").exists()


# Every image must load, and every plot must fill the content column (the width of the page's heading) at 1280 px.
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const column = document.querySelector("h1").getBoundingClientRect().width;
  const narrow = imgs.filter(i => i.getBoundingClientRect().width < 0.98 * column)
                     .map(i => i.alt + " " + Math.round(i.getBoundingClientRect().width) + "px");
  document.title = bad.length ? "BROKEN: " + bad.join("; ")
                 : narrow.length ? "NARROW of " + Math.round(column) + "px: " + narrow.join("; ")
                 : "IMAGES OK " + imgs.length;
});
</script>"""
WINDOW = "--window-size=1280,2400"


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["chromium", "--headless=new", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
           "--hide-scrollbars", WINDOW, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def rendered_title(page: str, tmp_path, name: str) -> str:
    """Load `page` (plus a script that checks every image) in headless Chromium at 1280 px; the title it ends with."""
    path = tmp_path / name
    path.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", path.as_uri()).stdout
    match = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert match, f"chromium dumped no page: {dom[:500]!r}"
    return match.group(1)


def screenshot(page_path, tmp_path, name: str):
    """A 1280 px wide screenshot of a report page (kept in tmp_path, and copied to $SEGPRUNE_SCREENSHOTS if set)."""
    import os

    shot = tmp_path / name
    _chromium(tmp_path, "--virtual-time-budget=10000", f"--screenshot={shot}", page_path.as_uri())
    if os.environ.get("SEGPRUNE_SCREENSHOTS"):
        shutil.copy(shot, os.environ["SEGPRUNE_SCREENSHOTS"])
    return shot


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_html_renders_in_headless_chromium_with_every_image(run_dir, tmp_path):
    page = (run_dir / "report.html").read_text()
    assert rendered_title(page, tmp_path, "report.html") == "IMAGES OK 7"  # every plot loads, at full width
    shot = screenshot(run_dir / "report.html", tmp_path, "report-1280.png")
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] == 1280 and len(np.unique(np.asarray(image.convert("L")))) > 50  # drawn, not blank
    first = image_sources(page)[0]
    corrupt = page.replace(first, first[:40] + "AAAA" + first[44:200], 1)  # the check can fail
    assert rendered_title(corrupt, tmp_path, "corrupt.html").startswith("BROKEN: ")  # the corrupted first figure


# Per-class IoU, foreground IoU, training curves, environment


def test_reports_gain_per_class_and_foreground_iou_curves_and_environment(tmp_path):
    (tmp_path / "train.csv").write_text("epoch,step,loss,lr,seconds,val_miou\n1,4,1.5,0.1,2,0.31\n2,8,1.1,0.1,2,\n"
                                        "3,12,0.9,0.1,2,0.44\n")
    report = fake_report(class_names=["background", "person & <b>"])
    for side, ious in (("before", [0.9, 0.6]), ("after", [0.88, float("nan")])):
        report[side].update(iou=ious, fg_iou=ious[1])
    write_report(tmp_path, report)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["per_class_iou"] == [{"class": 0, "name": "background", "before": 0.9, "after": 0.88},
                                      {"class": 1, "name": "person & <b>", "before": 0.6, "after": None}]
    assert saved["foreground_iou"] == {"before": 0.6, "after": None}
    assert saved["curves"] == {"train": {"epoch": [1, 2, 3], "loss": [1.5, 1.1, 0.9], "val_miou": [0.31, None, 0.44]}}
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1 and "cpu" in env and "gpu" in env
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    page = (tmp_path / "report.html").read_text()
    assert "<td>1 person &amp; &lt;b&gt;</td><td>60.00</td><td>n/a</td><td>n/a</td>" in page
    assert "<td>0 background</td><td>90.00</td><td>88.00</td><td>-2.00</td>" in page
    assert "Foreground IoU (class 1 of a binary task): 60.00 % before, n/a % after." in page
    assert "training curves" in page and len(image_sources(page)) == 2 + 1 + 1  # Pareto, widths, curves
    md = (tmp_path / "report.md").read_text()
    assert "| 0 background | 90.00 | 88.00 | -2.00 |" in md and f"torch {torch.__version__}" in md
    assert "| 2 | 1.1000 | n/a |" in md and "| 3 | 0.9000 | 44.00 |" in md


def test_read_curves_without_logs_and_the_environment_outside_git(tmp_path, monkeypatch):
    assert read_curves(tmp_path) is None
    (tmp_path / "finetune.csv").write_text("epoch,step,loss,lr,seconds\n1,4,0.7,0.01,2\n")
    assert read_curves(tmp_path) == {"fine-tune": {"epoch": [1], "loss": [0.7]}}
    from segprune.report import environment as env_module

    monkeypatch.setattr(env_module, "_PACKAGE", tmp_path)  # an installed package: no checkout around it
    assert env_module.environment()["git_commit"] is None and env_module.environment()["git_dirty"] is None
    assert environment()["python"].count(".") == 2


def test_model_report_of_a_trained_checkpoint(tmp_path):
    (tmp_path / "train.csv").write_text("epoch,step,loss,lr,seconds\n1,4,1.5,0.1,2\n2,8,1.0,0.1,2\n")
    metrics = dict(miou=0.55, iou=[0.8, 0.3], pixel_acc=0.9, mean_acc=0.7, fg_iou=0.3)
    report = write_model_report(tmp_path, title="human", metrics=metrics, class_names=["background", "person"],
                                cost=dict(params=1234, macs=5e6, size_bytes=8192), split="val")
    assert report["foreground_iou"] == 0.3 and report["per_class_iou"][1] == {"class": 1, "name": "person", "iou": 0.3}
    md = (tmp_path / "report.md").read_text()
    assert "| foreground IoU (%) | 30.00 |" in md and "| 1 person | 30.00 |" in md and "| params | 1,234 |" in md
    page = (tmp_path / "report.html").read_text()
    assert "Accuracy and cost on the val split" in page and len(image_sources(page)) == 1  # the curves
    with pytest.raises(ValueError, match="reports one model"):
        combined_report([tmp_path], tmp_path / "combined")


def test_curves_plot_draws_loss_and_miou():
    png = plots.curves({"train": {"epoch": [1, 2], "loss": [1.0, 0.5], "val_miou": [None, 0.4]},
                        "fine-tune": {"epoch": [1], "loss": [0.4]}})
    assert png.startswith(PNG)
    with pytest.raises(ValueError, match="no training curves"):
        plots.curves({"train": {"epoch": []}})


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_model_report_renders_full_width_at_1280px(tmp_path):
    (tmp_path / "train.csv").write_text("epoch,step,loss,lr,seconds,val_miou\n1,4,1.5,0.1,2,0.2\n2,8,1.0,0.1,2,0.3\n")
    report = fake_report(class_names=[f"class {k}" for k in range(11)])
    for side in ("before", "after"):
        report[side]["iou"] = [0.1 * k for k in range(11)]
    write_report(tmp_path, report)
    assert rendered_title((tmp_path / "report.html").read_text(), tmp_path, "check.html") == "IMAGES OK 4"
    shot = screenshot(tmp_path / "report.html", tmp_path, "report-1280.png")
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] == 1280
