"""Newcomer defects: a recipe with a YAML syntax error is one line naming the file, line and column; a folder
whose masks contradict the recipe's num_classes is refused; progress bars only on a terminal; an unknown recipe key
suggests the close one."""

import contextlib
import io

import numpy as np
import pytest
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from segprune import checkpoint
from segprune.cli import main
from segprune.data.base import LabelValueError
from segprune.data.folder import MaskFolder
from segprune.data.synthetic import SyntheticScenes
from segprune.train.loop import fit
from segprune.workflows.recipe import recipe_from

TINY = ["--model", "test_pspnet", "--set", "epochs=1", "--set", "train_samples=4", "--set", "val_samples=2",
        "--set", "batch_size=2", "--set", "size=[32,32]", "--set", "threads=1", "--quiet"]


@pytest.mark.parametrize("text, where", [("name: [x\n", "line 2, column 1"),
                                         ("epochs: 2\nlr: : 0.1\n", "line 2, column 5"),
                                         ('{"epochs": 2,, }', "line 1, column 14")])
def test_a_recipe_with_a_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys, text, where):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segprune: error: {recipe}, {where}: not valid YAML (")
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match=rf"broken.yaml, {where}"):
        recipe_from(recipe)


def _folder(root, top_label=7):
    """Four 32x32 image/mask pairs; the third mask holds labels up to ``top_label``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(root / "images" / f"{k}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 16:] = top_label if k == 2 else 1
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    return root


def test_a_recipe_num_classes_the_masks_contradict_is_an_error_naming_the_mask_and_label(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_classes: 3\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--data", f"folder:{root}", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'masks' / '2.png'}: label 7, but num_classes=3" in err, err
    assert not (out / "model").exists()
    with pytest.raises(LabelValueError, match="2.png: label 7"):
        MaskFolder(root, num_classes=7)


def test_an_unset_num_classes_is_inferred_and_said_a_given_one_is_used(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    assert main(["train", "--data", f"folder:{root}", "--out", str(tmp_path / "inferred"), *TINY]) == 0
    said = "8 classes, inferred from the largest mask label in"
    assert said in (tmp_path / "inferred" / "log.txt").read_text()
    assert checkpoint.load_config(tmp_path / "inferred" / "model")["model_kwargs"]["num_classes"] == 8
    # its saved recipe holds the default num_classes 6, which the model was not built with: still inferred
    assert main(["finetune", str(tmp_path / "inferred" / "model"), "--out", str(tmp_path / "tuned"), "--set",
                 "finetune_epochs=1", "--quiet"]) == 0
    out = tmp_path / "given"
    assert main(["train", "--data", f"folder:{root}", "--out", str(out), "--set", "num_classes=10", *TINY]) == 0
    assert said not in (out / "log.txt").read_text()
    assert checkpoint.load_config(out / "model")["model_kwargs"]["num_classes"] == 10
    capsys.readouterr()
    assert main(["eval", str(out / "model"), "--data", f"folder:{root}"]) == 0  # read with the model's 10 classes
    assert "mIoU" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit_writing_to(stream) -> str:
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
    with contextlib.redirect_stderr(stream):
        fit(net, DataLoader(SyntheticScenes(num_samples=8, size=(16, 16)), batch_size=2), epochs=2, lr=0.01)
    return stream.getvalue()


def test_progress_bars_are_drawn_on_a_terminal_only():
    assert "\r" not in _fit_writing_to(io.StringIO())  # a file or pipe: no carriage-return frames
    assert "\r" in _fit_writing_to(_Terminal())  # a terminal still gets its bar


def test_a_training_run_logged_to_a_file_prints_one_line_per_epoch(tmp_path, capsys):
    tiny = [word for word in TINY if word != "--quiet"] + ["--set", "epochs=2"]
    assert main(["train", "--data", "synthetic", "--out", str(tmp_path / "run"), *tiny]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]


def test_an_unknown_setting_suggests_the_close_one_first(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("epochz: 3\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segprune: error: unknown setting 'epochz' in {recipe}; did you mean 'epochs'? (known: ")
    with pytest.raises(ValueError, match=r"^unknown setting 'qqqq' \(known: name, task, model, ") as far:
        recipe_from(None, {"qqqq": 1})
    assert "did you mean" not in str(far.value)  # nothing close: no guess
