"""Newcomer defects: a recipe with a YAML syntax error is one line naming the file, line and column; a folder
whose masks contradict the recipe's num_classes is refused; progress bars only on a terminal; an unknown recipe key
suggests the close one."""

import pytest

from segprune.cli import main
from segprune.workflows.recipe import recipe_from


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
