"""Option groups and value types the subcommands share. Torch-free: help and input errors come
before any model loads."""

from __future__ import annotations

import argparse

from ..presets import PRESETS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after an option's help (not for flags or options without one); descriptions
    and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def command(sub, name: str, help: str, examples: str = "", description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and an "examples:" epilog."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()) if examples else None
    return sub.add_parser(name, help=help, description=description or help, epilog=epilog,
                          formatter_class=HelpFormatter)


# ----- value types: argparse turns their ArgumentTypeError into "error: ..." and exit 2

def strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"strength must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"strength must be in [0, 1], got {text}")
    return value


def strength_list(text: str) -> list[float]:
    return [strength(part) for part in text.split(",") if part.strip()]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def steps(text: str) -> int:
    value = positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"steps must be 1-1000, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be a whole number, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2^63), got {value}")
    return value


def policy_spec(text: str) -> str:
    from ..predictors.specs import check_spec

    try:
        return check_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("prompt is empty: type what the image should show")
    return text


# ----- groups

def model_options(p: argparse.ArgumentParser, *, overrides: bool = True, sampling: bool = True,
                  side: str = "pair", random_seed: bool = False, previews: bool = False) -> None:
    """--model (and --edge-model / --cloud-model overrides); --steps and --seed when it samples;
    --preview-decoder for commands that show edge previews."""
    group = p.add_argument_group("models")
    group.add_argument("--model", default="embedded", choices=sorted(PRESETS),
                       help=f"model {side} preset (`embedded` ships with the package; sd15 needs the hub cache)")
    if overrides:
        if side == "pair":
            group.add_argument("--edge-model", dest="edge", metavar="ID_OR_DIR",
                               help="edge model: a Hugging Face id or a diffusers folder (overrides the preset)")
        group.add_argument("--cloud-model", dest="cloud", metavar="ID_OR_DIR",
                           help="cloud model: a Hugging Face id or a diffusers folder (overrides the preset)")
    if previews:
        group.add_argument("--preview-decoder", default="default", metavar="ID_OR_DIR",
                           help="tiny decoder (AutoencoderTiny) for the edge's previews, finals keep the VAE: "
                                "default = the one the embedded pair ships, none = the VAE for previews too, "
                                "or a folder / Hugging Face id (madebyollin/taesd for SD v1.5 latents)")
    if sampling:
        group.add_argument("--steps", type=steps,
                           help="scheduler steps (default: the pair's own, 10 for embedded, 20 for the others)")
        if random_seed:
            group.add_argument("--seed", type=seed, help="seed of every new session (default: a random one each)")
        else:
            group.add_argument("--seed", type=seed, default=0, help="random seed of the first round")


def session_options(p: argparse.ArgumentParser) -> None:
    """Round-to-round and refinement strengths, and where the cloud is."""
    group = p.add_argument_group("session")
    strength_options(group)
    group.add_argument("--round-mode", choices=("fresh", "sdedit", "controlled", "local", "auto"),
                       help="how each round after the first relates to the one before (docs/control.md): auto "
                            "picks the measured mode per edit (demo's default); session's default: SDEdit at the "
                            "policy's strength")
    policy_option(group)
    cloud_url_options(group)
    group.add_argument("--finalize", choices=("refine", "regenerate"), default="refine",
                       help="refine keeps the approved preview (the cloud strength); regenerate asks the cloud for "
                            "a new image of the prompt (strength 1)")
    group.add_argument("--require-cloud", action="store_true",
                       help="exit 1 when the cloud could not refine the final (default: keep the preview, exit 0)")


def strength_options(group) -> None:
    """--edge-strength / --cloud-strength: the fixed policy's strengths; either one alone picks it."""
    group.add_argument("--edge-strength", type=strength,
                       help="round-to-round SDEdit strength of the fixed policy (default: 0.6); "
                            "given without --policy, it picks the fixed policy")
    group.add_argument("--cloud-strength", type=strength,
                       help="cloud refinement strength of the fixed policy (default: 0.5); "
                            "given without --policy, it picks the fixed policy")


def policy_option(group) -> None:
    from ..predictors.specs import SPEC_HELP

    group.add_argument("--policy", type=policy_spec, metavar="SPEC",
                       help=f"strength policy: {SPEC_HELP}; default: the model pair's own (learned for embedded, "
                            "fixed for the others), fixed when --edge-strength or --cloud-strength is given")


def chosen_policy_spec(args, pair) -> str:
    """--policy; else fixed when a fixed strength is given; else the pair's default policy."""
    if getattr(args, "policy", None):
        return args.policy
    return "fixed" if fixed_strengths(args) else pair.default_policy


def fixed_strengths(args) -> dict[str, float]:
    """The --edge-strength / --cloud-strength given, as policy_from_spec's keywords (it fills the rest);
    commands without those options give none."""
    given = {key: getattr(args, key, None) for key in ("edge_strength", "cloud_strength")}
    return {key: value for key, value in given.items() if value is not None}


def make_policy(args, pair, spec: str | None = None):
    """(spec, policy): the policy `spec` names (default: `chosen_policy_spec`), a fixed one filled in
    from --edge-strength / --cloud-strength and its spec spelled out (fixed-0.6-0.5)."""
    from ..errors import InvalidInputError
    from ..policies import FixedStrength
    from ..predictors.specs import policy_from_spec

    spec = spec or chosen_policy_spec(args, pair)
    try:
        policy = policy_from_spec(spec, **fixed_strengths(args))
    except ValueError as err:
        raise InvalidInputError(str(err)) from None
    if isinstance(policy, FixedStrength):
        spec = f"fixed-{policy.edge:g}-{policy.cloud:g}"
    return spec, policy


def cloud_url_options(group) -> None:
    group.add_argument("--cloud-url", metavar="URL",
                       help="the cloud service (`diffusionx serve`); default: refine in this process")
    group.add_argument("--token", help="bearer token for --cloud-url (default: $DIFFUSIONX_TOKEN)")


def out_option(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument("--out", default=default, metavar="PATH", help=what)


def lazy(module: str, name: str):
    """A command handler imported when it runs, so building the parser stays torch-free."""

    def handler(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    handler.__qualname__ = f"{module}.{name}"
    return handler
