"""The `diffusionx` command line, end to end."""

import json
import os
import subprocess
import sys

import pytest

from diffusionx.cli import DEMO_PROMPTS, main

pytestmark = pytest.mark.slow


def run_cli(*args, stdin=None, env=None, timeout=300):
    # One thread: the suite may share the 2 cores with other work, and spinning threads would fight.
    return subprocess.run(
        [sys.executable, "-m", "diffusionx.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_demo_writes_images_strip_and_report(tmp_path):
    result = run_cli("demo", "--model", "untrained", "--steps", "6", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ["round_01.png", "round_04.png", "final.png", "strip.png"]:
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["prompt"] for r in report["rounds"]] == list(DEMO_PROMPTS)
    first, second = report["rounds"][:2]
    assert first["strength"] == 1.0 and first["steps"] == 6
    assert second["strength"] == 0.6 and second["unet_steps"] == 4
    assert {"text_encode_s", "unet_s", "decode_s"} <= set(first["timing"]) and first["edge_seconds"] > 0
    final = report["final"]
    assert final["refined"] and final["strength"] == 0.5 and final["steps"] == 6
    assert final["cloud_seconds"] > 0 and final["bytes_up"] > 2048 and final["bytes_down"] > 2048
    assert report["models"]["untrained"] is True
    assert "UNTRAINED" in result.stdout and "untrained" in result.stderr


def test_generate_and_exit_codes(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "a red star", "--model", "untrained", "--steps", "2", "--out", str(out)]) == 0
    assert out.exists()
    assert main(["generate", "  ", "--model", "untrained", "--out", str(out)]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "a", "--model", "untrained", "--steps", "0", "--out", str(out)]) == 2
    assert "steps" in capsys.readouterr().err
    for bad in (["--seed", "abc"], ["--model", "nope"], ["--steps", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "a", *bad])
        assert exc.value.code == 2
    assert main(["demo", "--model", "untrained", "--out", str(tmp_path), "--edge-strength", "0"]) == 0


def test_missing_model_is_exit_1_with_one_line(tmp_path):
    result = run_cli("generate", "a cat", "--model", "sd15", env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "segmind/tiny-sd" in errors[0]
    assert "Traceback" not in result.stderr


def test_interactive_session_branches_and_survives_errors(tmp_path):
    script = "\n".join(
        [
            "a red circle on the left",
            "a red circle on the left on a blue background",
            "/back 9",
            "/back x",
            "/frobnicate",
            "/back 1",
            "a green circle on the left",
            "/history",
            "/final",
            "/quit",
        ]
    )
    result = run_cli("session", "--model", "untrained", "--steps", "4", "--out", str(tmp_path), stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "error: round 9 does not exist; this session has rounds 1-2" in out
    assert "usage: /back N" in out and "unknown command /frobnicate" in out
    assert "branches from round 1" in out
    assert "round 3 (sdedit" in out
    assert "final (refined by the cloud" in out
    assert (tmp_path / "round_03.png").exists() and (tmp_path / "final.png").exists()


def test_demo_with_an_unreachable_cloud_keeps_the_preview(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", "untrained", "--steps", "3", "--out", str(out), "--cloud", "http://127.0.0.1:9"]
    assert main(args) == 0
    final = json.loads((out / "report.json").read_text())["final"]
    assert final["refined"] is False and "127.0.0.1:9" in final["reason"]
    assert (out / "final.png").exists()
