"""`k2rl plot`: one metric of several runs on one figure."""

import json

from rl.cli import main


def _run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plot_overlays_runs_by_step_and_by_minutes(tmp_path):
    rows = [{"step": 0, "eval_accuracy": 0.4}, {"step": 1, "time_step_s": 30.0}, {"step": 2, "time_step_s": 30.0, "eval_accuracy": 0.6}]
    a, b = _run(tmp_path / "a", rows), _run(tmp_path / "b", rows)
    for x in ("step", "minutes"):
        out = tmp_path / f"{x}.png"
        assert main(["plot", f"uniform={a}", str(b), "--x", x, "--out", str(out)]) == 0
        assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_names_a_missing_run_metric_or_output_folder(tmp_path, capsys):
    run = _run(tmp_path / "a", [{"step": 0, "eval_accuracy": 0.4}])
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) != 0
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["plot", str(run), "--metric", "ptx_loss", "--out", str(tmp_path / "x.png")]) != 0
    assert "has no 'ptx_loss'" in capsys.readouterr().err
    assert main(["plot", str(run), "--out", str(tmp_path / "no" / "x.png")]) == 2
    assert capsys.readouterr().err == f"k2rl: error: --out {tmp_path / 'no' / 'x.png'}: folder {tmp_path / 'no'} does not exist\n"


def test_plot_takes_paths_with_equals_signs_and_refuses_one_label_twice(tmp_path, capsys):
    rows = [{"step": 0, "eval_accuracy": 0.4}]
    run = _run(tmp_path / "lr=1e-4", rows)
    assert main(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _run(tmp_path / "a" / "seed1", rows), _run(tmp_path / "b" / "seed1", rows)
    assert main(["plot", str(first), str(second), "--out", str(tmp_path / "y.png")]) == 2
    assert "two runs are labelled 'seed1'" in capsys.readouterr().err
