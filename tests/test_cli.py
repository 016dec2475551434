"""The `diffusionx` command line, end to end."""

import json
import os
import subprocess
import sys

import pytest

from diffusionx.cli import DEMO_PROMPTS, main
from diffusionx.control.rounds import auto_mode

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
    mode = auto_mode(DEMO_PROMPTS[0], DEMO_PROMPTS[1])[0]  # the demo's rounds take the auto mode
    assert second["mode"] == mode
    expected = {"sdedit": (0.6, 4), "local": (1.0, 6), "fresh": (1.0, 6)}[mode]  # edge strength 0.6 of 6 steps
    assert (second["strength"], second["unet_steps"]) == expected
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
    for bad in (["--seed", "abc"], ["--model", "nope"], ["--steps", "x"], ["--steps", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "a", *bad])
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["generate", "  "])
    assert exc.value.code == 2 and "prompt is empty" in capsys.readouterr().err
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
    args = ["demo", "--model", "untrained", "--steps", "3", "--out", str(out), "--cloud-url", "http://127.0.0.1:9"]
    assert main(args) == 0
    final = json.loads((out / "report.json").read_text())["final"]
    assert final["refined"] is False and "127.0.0.1:9" in final["reason"]
    assert (out / "final.png").exists()


# ----- the front door: fast help, exit codes, metadata, the session's commands ------------------
COMMANDS = ("demo", "session", "generate", "vocab", "ui", "serve", "bench", "evaluate", "bench-edits",
            "predictors", "train")


def test_help_builds_without_torch_and_every_command_has_examples():
    code = (
        "import sys, contextlib, io\n"
        "from diffusionx.cli import build_parser, main\n"
        f"for command in {COMMANDS!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit as done:\n"
        "            assert done.code == 0, command\n"
        "    assert 'examples:' in out.getvalue(), command\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("diffusionx ")


def test_input_is_checked_before_any_model_loads():
    code = (
        "import sys\n"
        "from diffusionx.cli import main\n"
        "codes = []\n"
        "for argv in (['generate', '  '], ['generate', 'a', '--steps', '0'], ['demo', '--edge-strength', '2']):\n"
        "    try:\n"
        "        codes.append(main(argv))\n"
        "    except SystemExit as done:\n"
        "        codes.append(done.code)\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[2, 2, 2] False", result.stderr
    assert "prompt is empty" in result.stderr and "must be at least 1" in result.stderr


def test_bad_model_path_is_bad_input(tmp_path, capsys):
    assert main(["generate", "a circle", "--edge-model", str(tmp_path / "no" / "such" / "model")]) == 2
    assert "neither a local folder" in capsys.readouterr().err


def test_require_cloud_turns_an_unrefined_final_into_exit_1(tmp_path, capsys):
    args = ["demo", "--model", "untrained", "--steps", "2", "--out", str(tmp_path), "--cloud-url", "http://127.0.0.1:9"]
    assert main([*args, "--require-cloud"]) == 1
    assert "--require-cloud" in capsys.readouterr().err
    assert (tmp_path / "final.png").exists()  # the preview is kept all the same


def test_png_metadata_is_the_a1111_parameters_chunk(tmp_path):
    from PIL import Image

    out = tmp_path / "x.png"
    args = ["generate", "a red star", "--model", "untrained", "--steps", "2", "--seed", "5", "--out", str(out)]
    assert main(args) == 0
    info = Image.open(out).info
    prompt, fields = info["parameters"].split("\n")
    assert prompt == "a red star"
    assert {"Steps: 2", "Seed: 5", "Sampler: DDIM", "CFG scale: 7.5"} <= set(fields.split(", "))
    assert json.loads(info["diffusionx"])["seed"] == 5


def test_commands_sample_the_pairs_default_steps_unless_told(tmp_path):
    from PIL import Image

    def steps_of(*extra):
        out = tmp_path / "x.png"
        assert main(["generate", "a red star", *extra, "--out", str(out)]) == 0
        fields = Image.open(out).info["parameters"].split("\n")[1].split(", ")
        return int(next(f for f in fields if f.startswith("Steps: ")).removeprefix("Steps: "))

    assert steps_of() == 10  # the embedded pair's pair.json
    assert steps_of("--steps", "3") == 3
    assert steps_of("--model", "untrained") == 20


def test_the_policy_is_the_one_named_else_fixed_for_given_strengths_else_the_pairs():
    from argparse import Namespace

    from diffusionx.cli.options import chosen_policy_spec, make_policy
    from diffusionx.policies import FixedStrength

    pair = Namespace(default_policy="similarity-rule")  # what load_pair sets (learned for embedded)

    def args(policy=None, edge=None, cloud=None):
        return Namespace(policy=policy, edge_strength=edge, cloud_strength=cloud)

    assert chosen_policy_spec(args(), pair) == "similarity-rule"
    assert chosen_policy_spec(args(edge=0.4), pair) == chosen_policy_spec(args(cloud=0.3), pair) == "fixed"
    assert chosen_policy_spec(args("fixed-0.2", edge=0.4), pair) == "fixed-0.2"  # --policy wins
    assert chosen_policy_spec(Namespace(policy=None), pair) == "similarity-rule"  # generate has no strengths
    spec, policy = make_policy(args(cloud=0.3), pair)  # the unnamed strength keeps its default
    assert (spec, policy) == ("fixed-0.6-0.3", FixedStrength(edge=0.6, cloud=0.3))
    spec, policy = make_policy(args("fixed-0.2", edge=0.4), pair)
    assert (spec, policy) == ("fixed-0.4-0.2", FixedStrength(edge=0.4, cloud=0.2))


def test_generate_on_the_pair_refines_the_edges_image_at_the_policys_strength(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "pair.png"
    assert main(["generate", "a red star", "--model", "untrained", "--steps", "4", "--policy", "fixed-0.5",
                 "--out", str(out)]) == 0
    assert "policy fixed-0.6-0.5" in capsys.readouterr().out
    report = json.loads(Image.open(out).info["diffusionx"])
    final = report["final"]
    assert final["refined"] and final["strength"] == 0.5 and final["unet_steps"] == 2  # half of 4 steps
    edge_only = tmp_path / "edge.png"
    assert main(["generate", "a red star", "--model", "untrained", "--steps", "4", "--out", str(edge_only)]) == 0
    assert "final" not in json.loads(Image.open(edge_only).info["diffusionx"])
    assert main(["generate", "a red star", "--side", "edge", "--policy", "learned"]) == 2  # nothing to refine
    assert "only --side pair uses" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_a_traceback(tmp_path):
    import signal
    import time

    def interrupted_demo(attempt: int) -> tuple[int, str]:
        log = tmp_path / f"stderr-{attempt}.txt"
        with log.open("w") as err:  # a file, not a pipe: the child never blocks on a full pipe
            # the default SIGINT action in the child, whatever this process inherited
            process = subprocess.Popen(
                [sys.executable, "-m", "diffusionx.cli", "demo", "--model", "untrained", "--steps", "200",
                 "--out", str(tmp_path / f"demo-{attempt}")],
                stdout=subprocess.DEVNULL, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            deadline = time.monotonic() + 120
            while "models:" not in log.read_text() and time.monotonic() < deadline:  # the pair is loaded
                assert process.poll() is None, log.read_text()
                time.sleep(0.05)
            time.sleep(0.2)  # now rendering
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        return process.returncode, log.read_text()

    code, stderr = interrupted_demo(1)
    if code == 0:  # the demo ran to its end before the signal arrived: once more
        code, stderr = interrupted_demo(2)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted" in stderr


def test_session_commands_tree_seed_policy_outputs_and_a_cancelled_round(tmp_path, monkeypatch, capsys):
    import io

    from diffusionx.session import EdgeSession

    real_generate = EdgeSession.generate

    def generate(self, prompt, **kwargs):
        if prompt == "boom":
            raise KeyboardInterrupt  # Ctrl-C while this round renders
        return real_generate(self, prompt, **kwargs)

    monkeypatch.setattr(EdgeSession, "generate", generate)
    script = ["a red circle", "a red circle on a blue background", "/back 1", "/seed 7", "/policy fixed-0.4-0.5",
              "boom", "a blue circle", "/history", "/policy", "/final", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    assert main(["session", "--model", "untrained", "--steps", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round cancelled" in out
    tree = [line for line in out.splitlines() if "s=" in line]
    assert tree[0].lstrip().startswith("1 fresh") and "└─" in tree[1] and "└─" in tree[2]
    assert tree[2].startswith("*") and "a blue circle" in tree[2]  # the current round, a branch of round 1
    assert "policy fixed-0.4-0.5" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["prompt"] for r in report["rounds"]] == ["a red circle", "a red circle on a blue background",
                                                       "a blue circle"]
    third = report["rounds"][2]
    assert third["parent"] == 1 and third["seed"] == 7 and third["strength"] == 0.4
    assert report["final"]["source_round"] == 3 and (tmp_path / "strip.png").exists()


def test_policy_specs_on_demo_and_errors_from_the_registry(tmp_path, capsys):
    from diffusionx.predictors.specs import SPEC_HELP

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--policy", "magic"])
    assert exc.value.code == 2 and SPEC_HELP in capsys.readouterr().err
    # SDEdit rounds take the policy's edge strength (the default auto mode may pick local or fresh rounds)
    args = ["demo", "--model", "untrained", "--steps", "4", "--out", str(tmp_path), "--policy", "fixed-0.5-0.25",
            "--round-mode", "sdedit"]
    assert main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"][1]["strength"] == 0.5 and report["final"]["strength"] == 0.25
    assert main([*args, "--finalize", "regenerate"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["final"]["strength"] == 1.0
