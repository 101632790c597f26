import json

from rl.cli import main


def test_score_keeps_order_and_survives_malformed_lines(tmp_path, capsys):
    lines = [
        json.dumps({"response": r"so \boxed{4}", "answer": "4", "id": "a"}),
        "{not json",
        json.dumps({"response": "it is 5", "answer": "4"}),
        json.dumps({"answer": "4"}),
        json.dumps({"response": "no idea", "answer": "4"}),
        json.dumps({"response": r"\boxed{2}"}),
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")

    assert main(["score", "--reward", "math", "--input", str(source), "--output", str(target), "--concurrency", "3"]) == 0

    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["reward"] for row in out] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    reasons = [row["reward_info"]["reason"] for row in out]
    assert reasons[0] == "correct" and reasons[2] == "wrong_answer" and reasons[4] == "no_answer"
    assert reasons[1].startswith("malformed_line: invalid JSON")
    assert reasons[3] == "malformed_line: no 'response' string"
    assert reasons[5].startswith("reward_error: ValueError")
    assert out[0]["id"] == "a" and out[0]["answer"] == "4"
    summary = capsys.readouterr().out
    assert "6 responses, mean reward 0.1667" in summary and "malformed_line: 2" in summary


def test_score_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["score", "--reward", "math", "--input", str(tmp_path / "none.jsonl"), "--output", "x"]) == 2
    source = tmp_path / "in.jsonl"
    source.write_text("{}\n")
    assert main(["score", "--reward", "nope", "--input", str(source), "--output", str(tmp_path / "o")]) == 2
    assert main(["score", "--reward", "math", "--input", str(source), "--output", str(tmp_path / "no" / "o.jsonl")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 3 and "does not exist" in errors[0] and "unknown reward 'nope'" in errors[1]
    assert errors[2] == f"k2rl: error: --output {tmp_path / 'no' / 'o.jsonl'}: folder {tmp_path / 'no'} does not exist"
