"""`diffusionx session`: an interactive multi-round session in the terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from . import options

COMMANDS = """\
commands:
  PROMPT       the next round: the edge model edits the current round's image toward PROMPT
  /back N      branch: the next round starts from round N (nothing is deleted)
  /history     every round as a tree of branches (* marks the current one)
  /seed N      the seed of the next rounds
  /policy      the strength policy; /policy SPEC sets it (fixed-C, fixed-E-C, learned, load-aware, ...)
  /help        this list
  /final [M]   the cloud finalizes the current round (M: refine keeps it, regenerate makes a new
               image of the prompt): final.png, strip.png, report.json
  /quit        end (also Ctrl-D); Ctrl-C cancels only a round that is rendering"""

EXAMPLES = """
diffusionx session
diffusionx session --out outputs/mine --cloud-url http://127.0.0.1:8000 --token $TOKEN
printf 'a red circle\\na red circle on a blue background\\n/final\\n' | diffusionx session
"""


def register(sub) -> None:
    p = options.command(sub, "session", "interactive multi-round session in the terminal", EXAMPLES,
                        description="Type a prompt per line; each one makes a round on the edge model.\n\n" + COMMANDS)
    options.model_options(p, previews=True)
    options.session_options(p)
    options.out_option(p, "outputs/session", "output folder: round_NN.png, final.png, strip.png, report.json")
    p.set_defaults(func=run)


def history_tree(rounds, head: int | None) -> list[str]:
    """Rounds as a tree: each round under the one it started from, branches side by side."""
    children: dict[int | None, list] = {}
    for r in rounds:
        children.setdefault(r.parent, []).append(r)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for r in children.get(parent, []):
            marker = "*" if r.index == head else " "
            indent = "   " * depth + ("└─ " if depth else "")
            lines.append(f"{marker} {indent}{r.index:>2} {r.mode:<7} s={r.strength:.2f}  {r.prompt}")
            walk(r.index, depth + 1)

    walk(None, 0)
    return lines


def run(args) -> int:
    from ..errors import InvalidInputError
    from ..session import EdgeSession
    from .runtime import cloud_client, load_pair, save_final, save_round, write_session_outputs

    start = time.perf_counter()
    out = Path(args.out)
    pair = load_pair(args)
    policy_name, policy = options.make_policy(args, pair)
    session = EdgeSession(pair, policy=policy, steps=args.steps, seed=args.seed, cloud=cloud_client(args))
    interactive = sys.stdin.isatty()
    print(COMMANDS)
    final = None
    while True:
        marker = f"round {len(session.rounds) + 1}> " if interactive else ""
        try:
            line = input(marker).strip()
        except EOFError:
            break
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                break
            elif line == "/help":
                print(COMMANDS)
            elif line == "/history":
                print("\n".join(history_tree(session.rounds, session.head)) or "no rounds yet")
            elif line.startswith("/back"):
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise InvalidInputError("usage: /back N (N = a round number from /history)")
                r = session.back(int(parts[1]))
                print(f"next round branches from round {r.index}: {r.prompt}")
            elif line.startswith("/seed"):
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise InvalidInputError("usage: /seed N (a whole number)")
                session.seed = int(parts[1])
                print(f"seed {session.seed} from the next round on")
            elif line.startswith("/policy"):
                parts = line.split()
                if len(parts) == 2:
                    policy_name, session.policy = options.make_policy(args, pair, parts[1])
                elif len(parts) != 1:
                    raise InvalidInputError("usage: /policy or /policy SPEC (e.g. fixed-0.6-0.5, learned)")
                print(f"policy {policy_name}")
            elif line.split()[0] == "/final":
                parts = line.split()
                mode = parts[1] if len(parts) == 2 else args.finalize
                if len(parts) > 2 or mode not in ("refine", "regenerate"):
                    raise InvalidInputError("usage: /final [refine|regenerate]")
                final = session.finalize(mode=mode)
                path = save_final(final, out / "final.png", pair, session)
                state = "refined by the cloud" if final.refined else f"NOT refined ({final.reason})"
                print(f"final ({state}, strength {final.strength:.2f}): {path}")
            elif line.startswith("/"):
                raise InvalidInputError(f"unknown command {line.split()[0]}; /help lists them")
            else:
                try:
                    r = session.generate(line, progress=True, mode=args.round_mode)
                except KeyboardInterrupt:
                    print("round cancelled (the session is as it was; Ctrl-D or /quit ends it)")
                    continue
                path = save_round(r, out / f"round_{r.index:02d}.png", pair)
                print(f"round {r.index} ({r.mode}, strength {r.strength:.2f}, {r.timing.total_s:.2f} s): {path}")
        except InvalidInputError as err:
            print(f"error: {err}")
        sys.stdout.flush()
    if session.rounds:
        write_session_outputs(session, final, out, pair, time.perf_counter() - start)
        print(f"wrote {out}/strip.png and report.json ({len(session.rounds)} rounds)")
    if final is not None and not final.refined and args.require_cloud:
        print(f"error: the cloud did not refine the final ({final.reason})", file=sys.stderr)
        return 1
    return 0
