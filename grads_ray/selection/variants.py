"""Named variants of a selection method, for ablations (``grads-ray compare`` strategies such as
``grads:core:5%``, ``grads:core+dedup:5%``, ``grads:all-clusters:5%``).

A variant is a ``+``/``-`` expression over named switches; each resolves to select-stage overrides
(dotted key -> value) applied on top of the run's config. For GrADS (docs/grads.md, "Variants"):

- ``core``: the method as the paper's abstract states it: the gradient-statistic signal and the KDE
  region taken from. Every switch below is off, and so are the loss term (``w_loss``) and the greedy
  similarity pass (``select.max_similarity``); the signal's and the region's own settings (stats,
  groups, normalize, region, bandwidth) and per-source quotas stay as configured.
- ``all``: every switch on (at the config's setting where the config has it on, else the default).
- the switches (our additions to the paper's core, each one documented setting):
  ``band`` (the ±k criteria: ``select.grads.direction``), ``diversity`` (``w_diversity``),
  ``redundancy`` (``w_redundancy``), ``clusters`` (k-means quotas, ``cluster_alpha``), ``dedup``
  (the near-duplicate cap, ``select.dedup``; the only switch other methods take).
- a modifier: ``norm``, the signal from the gradient norm alone (``select.grads.stats=[grad_norm]``)
  instead of all five statistics.
- a name from ``compare.variants`` (the user's own: a list of ``select.*`` overrides), added with ``+``
  or standing first (then on top of the config as given).

An expression that starts with ``+``/``-`` or a user variant starts from the config as given.
Arrays are not involved: strings in, overrides out.
"""

from __future__ import annotations

import re
from typing import Any

from grads_ray.config import ConfigError, SelectConfig, parse_override, with_settings

GRADS_SWITCHES = ("band", "diversity", "redundancy", "clusters", "dedup")
OTHER_SWITCHES = ("dedup",)  # what the other methods take
MODIFIERS = {"norm": {"select.grads.stats": ["grad_norm"]}}
CORE_OFF = {"select.grads.w_loss": 0.0, "select.max_similarity": 0.0}  # not switches: off in core, kept in all
ON = {"w_diversity": 0.5, "w_redundancy": 0.5, "cluster_alpha": 0.5}  # a switch's setting when the config has it off
TOKEN = re.compile(r"([+-]?)([A-Za-z0-9_.]+)")
NAME = re.compile(r"[A-Za-z0-9_.]+")
BUILT_IN = frozenset({"core", "all", *GRADS_SWITCHES, *MODIFIERS})


def switch_settings(name: str, on: bool, sc: SelectConfig) -> dict[str, Any]:
    """One switch on or off -> its overrides. "On" keeps the config's own setting where it is on,
    else takes :data:`ON`, so ``all`` on a tuned config keeps the tuning."""
    g = sc.grads
    if name == "band":
        if not on:
            return {"select.grads.direction": "none", "select.grads.directions": {}}
        return {"select.grads.direction": g.direction if g.direction != "none" else "both",
                "select.grads.directions": dict(g.directions)}
    if name in ("diversity", "redundancy"):
        key = f"w_{name}"
        mine = getattr(g, key)
        return {f"select.grads.{key}": (mine if mine > 0 else ON[key]) if on else 0.0}
    if name == "clusters":
        alpha = g.cluster_alpha if g.cluster_alpha >= 0 else ON["cluster_alpha"]
        return {"select.grads.cluster_alpha": alpha if on else -1.0}
    if name == "dedup":
        return {"select.dedup": "true" if on else "false"}
    raise ConfigError(f"unknown switch {name!r}")


def variant_settings(method: str, variant: str, sc: SelectConfig,
                     user: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A variant expression -> the ordered select-stage overrides it stands for (dotted key ->
    value; later entries win). ``user``: ``compare.variants``. Raises ConfigError naming what is wrong."""
    user = user or {}
    check_user_variants(user)
    text = variant.strip()
    tokens = TOKEN.findall(text)
    if not text or "".join(s + n for s, n in tokens) != text:
        raise ConfigError(f"strategy variant {variant!r}: expected names joined by + or - "
                          f"(e.g. core+dedup, all-clusters)")
    switches = GRADS_SWITCHES if method == "grads" else OTHER_SWITCHES
    out: dict[str, Any] = {}

    def put(settings: dict[str, Any]) -> None:  # later entries win: a key set again moves to the end
        for key, value in settings.items():
            for old in [k for k in out if k == key or k.startswith(key + ".")]:
                del out[old]
            out[key] = value

    for i, (sign, name) in enumerate(tokens):
        if name in ("core", "all"):
            if i or sign:
                raise ConfigError(f"strategy variant {variant!r}: {name} can only stand first")
            if method != "grads":
                raise ConfigError(f"strategy variant {variant!r}: {name} is a grads variant, not {method}'s")
            for s in GRADS_SWITCHES:
                put(switch_settings(s, name == "all", sc))
            if name == "core":
                put(CORE_OFF)
        elif name in switches:
            if not sign and i:
                raise ConfigError(f"strategy variant {variant!r}: join names with + or -")
            put(switch_settings(name, sign != "-", sc))
        elif name in MODIFIERS or name in user:
            if sign == "-":
                raise ConfigError(f"strategy variant {variant!r}: {name} can be added (+), not removed")
            if name in MODIFIERS and method != "grads":
                raise ConfigError(f"strategy variant {variant!r}: {name} is a grads modifier, not {method}'s")
            put(MODIFIERS.get(name) or user_settings(name, user[name]))
        else:
            known = [*(("core", "all", *switches, *MODIFIERS) if method == "grads" else switches), *sorted(user)]
            raise ConfigError(f"strategy variant {variant!r}: unknown name {name!r} for {method} "
                              f"(known: {', '.join(known)}; your own go under compare.variants)")
    return out


def check_user_variants(user: dict[str, list[str]], cfg: Any = None) -> None:
    """``compare.variants``' names must be usable in an expression and not shadow a built-in name;
    every entry's overrides must be select-stage ones (:func:`user_settings`) and, given the run's
    ``cfg``, valid settings of it."""
    for name, overrides in user.items():
        if not NAME.fullmatch(name) or name in BUILT_IN:
            raise ConfigError(f"compare.variants.{name}: a variant's name is letters, digits, _ and . and not one "
                              f"of the built-in names ({', '.join(sorted(BUILT_IN))})")
        settings = user_settings(name, overrides)
        if cfg is not None:
            try:
                with_settings(cfg, settings)
            except ConfigError as exc:
                raise ConfigError(f"compare.variants.{name}: {exc}") from None


def user_settings(name: str, overrides: list[str]) -> dict[str, Any]:
    """A ``compare.variants`` entry (``["select.grads.k=5", ...]``) -> dotted overrides. Only the
    select stage may change: the stages before it are shared by every strategy of a seed (LESS's
    target set is scored by a stage of its own, so ``select.less`` is refused too)."""
    out: dict[str, Any] = {}
    for text in overrides:
        tree = parse_override(text)
        key = text.split("=", 1)[0].strip()
        if not key.startswith("select.") or key.startswith(("select.method", "select.budget", "select.less")):
            raise ConfigError(f"compare.variants.{name}: {text!r} must set a select.* key other than the "
                              "method, budget and less settings (the stages before select are shared by every "
                              "strategy)")
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out
