"""One policy for used outputs (segprune.workflows.rundir.claim / claim_file): every command that writes refuses a
used --out (or --onnx, --torchscript, --json) in one wording before any work, and goes on with --force; no other
module of segprune words a refusal of its own.

The commands are pointed at checkpoints that do not exist: a refusal that comes first shows the claim is made before
any work, and the missing checkpoint's error after --force shows the claim let the command through."""

import re
from pathlib import Path

import pytest

import segprune
from segprune.cli import main
from segprune.workflows import rundir
from segprune.workflows.rundir import claim, claim_file

TINY = ["--set", "model=test_pspnet", "--set", "width=0.03125", "--set", "train_samples=4", "--set", "val_samples=2",
        "--set", "epochs=1", "--set", "size=[32,32]", "--quiet"]


def wording(where, names, option="--out") -> str:
    return f"{where} already holds {names}; choose another {option} or pass --force"


@pytest.fixture
def used(tmp_path) -> Path:
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    return folder


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_a_free_folder_is_claimed_without_creating_anything(tmp_path):
    assert claim(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert claim(tmp_path / "empty") == tmp_path / "empty"


def test_a_run_that_failed_before_its_first_checkpoint_leaves_its_folder_free(tmp_path):
    for name in rundir.LEFTOVERS:
        (tmp_path / name).write_text("")
    assert claim(tmp_path) == tmp_path
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileExistsError) as err:
        claim(tmp_path)
    assert str(err.value) == wording(tmp_path, "checkpoints")


def test_the_refusal_names_what_the_folder_holds_and_force_goes_on(tmp_path):
    for k in range(7):
        (tmp_path / f"f{k}.txt").write_text("")
    with pytest.raises(FileExistsError) as err:
        claim(tmp_path, option="--somewhere")
    assert str(err.value) == wording(tmp_path, "f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 2 more", "--somewhere")
    assert claim(tmp_path, force=True) == tmp_path
    assert [p.name for p in tmp_path.iterdir() if p.name == "f0.txt"]  # claiming never deletes


def test_writes_limits_what_makes_a_folder_used(used):
    assert claim(used, writes=("predictions.json",)) == used
    (used / "predictions.json").write_text("{}")
    with pytest.raises(FileExistsError, match=re.escape(wording(used, "predictions.json"))):
        claim(used, writes=("predictions.json", "other.json"))


def test_a_file_is_no_folder_even_with_force(used):
    with pytest.raises(FileExistsError, match="is a file, not a folder; choose another --out"):
        claim(used / "keep.txt", force=True)


def test_resume_semantics_are_kept(used, tmp_path):
    with pytest.raises(FileExistsError, match=re.escape(wording(used, "keep.txt") + " (or --resume")):
        claim(used, resume=False)
    with pytest.raises(ValueError, match="pass one"):
        claim(used, resume=True, force=True)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        claim(tmp_path / "none", resume=True)
    (used / "checkpoints").mkdir()
    (used / "recipe.yaml").write_text("seed: 1\n")
    assert claim(used, resume=True, settings={"seed": 1}) == used
    with pytest.raises(ValueError, match="these differ: seed"):
        claim(used, resume=True, settings={"seed": 2})


def test_claim_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    assert claim_file(target) == target
    target.write_bytes(b"model")
    with pytest.raises(FileExistsError) as err:
        claim_file(target, option="--onnx")
    assert str(err.value) == wording(tmp_path, "m.onnx", "--onnx")
    assert claim_file(target, force=True) == target and target.read_bytes() == b"model"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match=re.escape(wording("the current folder", "m.onnx", "--json"))):
        claim_file("m.onnx", option="--json")
    with pytest.raises(FileExistsError, match="is a folder, not a file"):
        claim_file(tmp_path, force=True)


@pytest.mark.parametrize("command", ["demo", "run", "train"])
def test_run_commands_refuse_a_used_folder_and_force_starts_over(command, used, tmp_path, capsys, monkeypatch):
    (tmp_path / "recipe.yaml").write_text("data: synthetic\n")
    recipe = [str(tmp_path / "recipe.yaml")] if command == "run" else []
    argv = [command, *recipe, "--out", str(used), *TINY]
    assert wording(used, "keep.txt") in refused(argv, capsys)

    def started(out, settings, **kwargs):
        raise RuntimeError(f"started in {out}")

    monkeypatch.setattr(rundir, "start", started)  # what --force runs next: the claim let it through
    with pytest.raises(RuntimeError, match="started in"):
        main([*argv, "--force"])
    assert (used / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_checkpoint_steps_refuse_a_used_folder_before_reading_the_checkpoint(command, used, tmp_path, capsys):
    argv = [command, str(tmp_path / "missing"), "--out", str(used)]
    assert wording(used, "keep.txt") in refused(argv, capsys)
    err = refused([*argv, "--force"], capsys)
    assert "already holds" not in err and "missing" in err


def test_predict_refuses_a_folder_holding_predictions(used, tmp_path, capsys):
    argv = ["predict", str(tmp_path / "missing"), str(tmp_path), "--out", str(used)]
    assert "already holds" not in refused(argv, capsys)  # other files do not make it used
    (used / "predictions.json").write_text("{}")
    assert wording(used, "predictions.json") in refused(argv, capsys)
    err = refused([*argv, "--force"], capsys)
    assert "already holds" not in err and "missing" in err


def test_report_refuses_a_folder_holding_a_report(used, tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        run.mkdir()
        (run / "report.json").write_text("{}")  # a run's report, unreadable: read only after the claim
    argv = ["report", *map(str, runs), "--out", str(used)]
    (used / "report.md").write_text("mine")
    assert wording(used, "report.md") in refused(argv, capsys)
    err = refused([*argv, "--force"], capsys)
    assert "already holds" not in err and str(runs[0]) in err


@pytest.mark.parametrize("option", ["--onnx", "--torchscript"])
def test_export_refuses_an_existing_file(option, tmp_path, capsys):
    target = tmp_path / "model.out"
    target.write_text("mine")
    argv = ["export", str(tmp_path / "missing"), option, str(target)]
    assert wording(tmp_path, "model.out", option) in refused(argv, capsys)
    err = refused([*argv, "--force"], capsys)
    assert "already holds" not in err and "missing" in err
    assert target.read_text() == "mine"


def test_bench_json_refuses_an_existing_file_and_takes_force(tmp_path, capsys):
    target = tmp_path / "bench.json"
    target.write_text("mine")
    argv = ["bench", str(tmp_path / "missing"), "--input-size", "32", "32", "--json", str(target)]
    assert wording(tmp_path, "bench.json", "--json") in refused(argv, capsys)
    err = refused([*argv, "--force"], capsys)
    assert "already holds" not in err and "missing" in err


REFUSAL = re.compile(r"already holds .*choose another|already exists|pass --force|FileExistsError\(")


def other_policies(root: Path) -> list[str]:
    """`file:line` of every refusal of a used output worded outside workflows/rundir.py."""
    return [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py"))
            if path.relative_to(root) != Path("workflows/rundir.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if REFUSAL.search(line)]


def test_no_second_policy_is_left():
    assert other_policies(Path(segprune.__file__).parent) == []


def test_a_second_policy_would_be_found(tmp_path):
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "rundir.py").write_text('raise FileExistsError("x already holds y")\n')
    (tmp_path / "export.py").write_text('if p.exists():\n    raise FileExistsError(f"{p} already exists")\n')
    assert other_policies(tmp_path) == ["export.py:2"]
