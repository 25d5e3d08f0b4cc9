"""The report: tables laid out like the paper's (Tables 1, 3, 4), choice histograms, report.md
and the Figure 2 / 3 plots."""

from __future__ import annotations

import json
import os

from jax_specsel.decoding import AUTOREGRESSIVE
from jax_specsel.models.interface import Model

ORDER_FIRST = (AUTOREGRESSIVE,)
ORDER_LAST = ("policy_greedy", "policy_dynamic", "policy_adaptive")


def _ordered(options) -> list[str]:
  middle = [o for o in options if o not in ORDER_FIRST + ORDER_LAST]
  return [o for o in ORDER_FIRST if o in options] + middle + [o for o in ORDER_LAST if o in options]


def results_table(result: dict) -> str:
  """Markdown: one row per option; per domain quality, speedup (ms/token ± spread), accept %."""
  domains = list(result["domains"])
  options = _ordered(next(iter(result["domains"].values())))
  head = "| option | " + " | ".join(
      f"{d}: quality | {d}: speedup (ms/token) | {d}: accept %" for d in domains
  )
  head += " | average speedup |\n|---" + "|---" * (3 * len(domains) + 1) + "|\n"
  lines = []
  for option in options:
    cells, speedups = [], []
    for d in domains:
      row = result["domains"][d][option]
      accept = "-" if row["acceptance_rate"] is None else f"{100 * row['acceptance_rate']:.1f}"
      quality = "-" if row["quality"] is None else f"{row['quality']:.2f}"
      cells += [
          quality,
          f"{row['speedup']:.2f}x ({row['ms_per_token']:.3f} ± "
          f"{row['ms_per_token_spread']:.3f})",
          accept,
      ]
      speedups.append(row["speedup"])
    lines.append(
        f"| {option} | " + " | ".join(cells) + f" | {sum(speedups) / len(speedups):.2f}x |"
    )
  return head + "\n".join(lines) + "\n"


def choices_table(result: dict) -> str:
  """Markdown: share of queries per option chosen by each policy variant, per domain."""
  lines = ["| domain | policy | choices |", "|---|---|---|"]
  for domain, variants in result.get("choices_by_variant", {}).items():
    for variant, shares in variants.items():
      text = ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
      lines.append(f"| {domain} | {variant} | {text} |")
  return "\n".join(lines) + "\n"


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, default=float)
  os.replace(path + ".tmp", path)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  return plt


def option_colours(names) -> dict:
  """One fixed colour per option name (tab10), so an option looks the same in every panel."""
  import matplotlib

  cycle = matplotlib.colormaps["tab10"].colors
  return {name: cycle[i % len(cycle)] for i, name in enumerate(sorted(names))}


_SINGLE_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)))


def _finish_ms_per_token_axes(ax, single_options: dict, xlabel: str) -> None:
  """Each single option's ms/token as a horizontal line in its own colour and dash pattern,
  labelled in the legend and at its right end (lines of equal value stay distinguishable)."""
  colours = option_colours(single_options)
  for i, (option, ms) in enumerate(sorted(single_options.items(), key=lambda kv: kv[1])):
    ax.axhline(
        ms,
        linestyle=_SINGLE_STYLES[i % len(_SINGLE_STYLES)],
        linewidth=1.4,
        color=colours[option],
        label=f"{option} ({ms:.3f} ms)",
    )
    ax.annotate(
        option,
        xy=(1.0, ms),
        xycoords=("axes fraction", "data"),
        xytext=(3, 0),
        textcoords="offset points",
        fontsize=7,
        color=colours[option],
        va="center",
    )
  ax.set_xlabel(xlabel)
  ax.set_ylabel("ms/token")
  ax.legend(fontsize=7)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)


def plot_alpha_sweep(sweep: dict, path: str) -> None:
  """Figure 2: share of choices per option and ms/token versus alpha."""
  alphas = [p["alpha"] for p in sweep["points"]]
  fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4))
  colours = option_colours(sweep["options"])
  for option in sweep["options"]:
    left.plot(
        alphas,
        [p["shares"].get(option, 0.0) for p in sweep["points"]],
        marker="o",
        label=option,
        color=colours[option],
    )
  left.set_xlabel("alpha (weight of alignment, eq. 2)")
  left.set_ylabel("share of queries")
  left.legend()
  right.plot(
      alphas,
      [p["ms_per_token"] for p in sweep["points"]],
      marker="o",
      color="black",
      label="policy",
  )
  _finish_ms_per_token_axes(right, sweep["single_options"], "alpha")
  _save(fig, path)


def plot_sample_efficiency(curve: dict, path: str) -> None:
  """Figure 3: ms/token of the policy versus training examples (log x), single options as lines."""
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  sizes = [p["examples"] for p in curve["points"]]
  ax.errorbar(
      sizes,
      [p["ms_per_token"] for p in curve["points"]],
      yerr=[p.get("ms_per_token_spread", 0.0) for p in curve["points"]],
      marker="o",
      color="black",
      label="policy",
  )
  ax.set_xscale("log")
  _finish_ms_per_token_axes(ax, curve["single_options"], "training examples")
  _save(fig, path)


def plot_shift(shifted: dict, path: str) -> None:
  """ms/token (running mean) against queries seen on the shifted domain, per variant."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, values in shifted["running"].items():
    style = "-" if name in ("online", "frozen") else ":"
    ax.plot(range(1, len(values) + 1), values, style, label=name)
  ax.set_xlabel("queries seen")
  ax.set_ylabel(f"ms/token (mean of the last {shifted['window']})")
  ax.set_title(f"shifted domain: {shifted.get('domain', '')}")
  ax.legend(fontsize=7)
  _save(fig, path)


def markdown_report(payload: dict, target: Model, drafters: dict[str, Model]) -> str:
  """report.md: the header, the tables, the checks and the figures of `write_report`'s payload."""
  sizes = ", ".join(f"{name} {model.num_params / 1e6:.2f}M" for name, model in drafters.items())
  models = payload.get("models", {})
  parts = [
      f"# Context-aware drafter selection: report\n\nTarget {target.name} "
      f"({target.num_params / 1e6:.2f}M params); drafters: {sizes}. "
      f"{models.get('provenance', '')}\n",
      _regime_markdown(models.get("regime")),
      _partial_collection_note(payload.get("collection")),
      "## Table 1 layout: quality, speedup (ms/token ± spread over seeds), acceptance\n",
      _repeat_timing_note(payload),
      results_table(payload),
      "\n## Choices of the policy per domain\n",
      choices_table(payload),
      "\n## What choosing costs\n",
      _policy_cost_markdown(payload),
      "\n## Per-round choice (policy_adaptive): share of rounds per option\n",
      _round_choices_markdown(payload),
      _shifted_markdown(payload),
      "\n## Checks of the paper's effect\n",
      _shortfalls_markdown(payload["shortfalls"]),
      "```json\n" + json.dumps(payload["checks"], indent=2) + "\n```\n",
      "\n## Figures\n\n![alpha sweep](figure2_alpha_sweep.png)\n\n"
      "![sample efficiency](figure3_sample_efficiency.png)\n",
  ]
  return "\n".join(parts)


def _repeat_timing_note(payload) -> str:
  """How the repeats of a query make its time (`run_tables.summarize`'s "repeat_timing")."""
  if payload.get("repeat_timing") == "fastest":
    return (
        "\nGreedy repeats decode the same tokens: each query counts its fastest repeat (a stall"
        " of the shared machine only adds time); the spread is over the repeats' totals.\n\n"
    )
  return ""


def _regime_markdown(regime: dict | None) -> str:
  """The measured step costs: whether this machine is in the regime where speculation pays."""
  if not regime or regime.get("round_target_steps") is None:
    return ""
  steps = ", ".join(
      f"{name} {us:.1f} us (ratio {regime['step_ratio'][name]:.0f})"
      for name, us in regime["drafter_step_us"].items()
  )
  return (
      f"Measured here, inside compiled loops: a target step {regime['target_step_us']:.0f} us; "
      f"drafter steps {steps}; a gamma-{regime['gamma']} round with {regime['round_drafter']} "
      f"costs {regime['round_target_steps']:.2f} target steps (speculation pays where this is "
      "close to 1: a memory-bound target).\n"
  )


def _policy_cost_markdown(payload: dict) -> str:
  """The policy's measured share of per-query time (fused call minus the plain call with the
  option it chose, same queries and seeds)."""
  cost = payload.get("policy_cost", {})
  if not cost:
    return "No policy was evaluated.\n"
  variants = list(cost["all"])
  lines = [
      "| domain | "
      + " | ".join(f"{v}: share / ms per query / median fused:plain" for v in variants)
      + " |",
      "|---|" + "---|" * len(variants),
  ]
  for domain, by_variant in cost.items():
    cells = [
        f"{100 * by_variant[v]['share']:.2f}% / {by_variant[v]['ms_per_query']:.3f} / "
        f"{by_variant[v]['median_ratio']:.3f}"
        for v in variants
    ]
    lines.append(f"| {domain} | " + " | ".join(cells) + " |")
  return (
      "Measured: `generate_selected` (embed from the target's first pass, policy, decode, in one "
      "program) minus `generate` with the option it chose, same query and seed.\n\n"
      + "\n".join(lines)
      + "\n"
  )


def _round_choices_markdown(payload: dict) -> str:
  shares = payload.get("round_choices") or {}
  if not shares:
    return "Not run (the config has no `adaptive` section).\n"
  work = payload.get("round_work") or {}
  lines = [
      "| domain | rounds drafted by | tokens per target step: achieved / best fixed in "
      "hindsight |",
      "|---|---|---|",
  ]
  for domain, by_option in shares.items():
    cells = ", ".join(f"{name} {100 * share:.0f}%" for name, share in by_option.items() if share)
    row = work.get(domain)
    ratio = (
        f"{row['achieved']:.2f} / {row['best_fixed_hindsight']:.2f} ({row['ratio']:.2f})"
        if row
        else "-"
    )
    lines.append(f"| {domain} | {cells} | {ratio} |")
  note = (
      "\nWork in the measured costs' units (a target step = 1; the reads that scored "
      "drafters count): what the per-round choices got against the best single option with "
      "the acceptance it showed on the same query, apart from the loop's wall-time "
      "overhead.\n"
  )
  return "\n".join(lines) + "\n" + (note if work else "")


def _shifted_markdown(payload: dict) -> str:
  shifted = payload.get("shifted") or {}
  if not shifted:
    return ""
  finals = ", ".join(f"{name} {value:.3f}" for name, value in shifted["final"].items())
  return (
      f"\n## Shifted domain: {shifted['domain']} held out of the policy's training\n\n"
      f"The held-out policy's greedy choices there: {shifted['prior_choices']}. "
      f"{shifted['queries']} queries served in turn; ms/token over the last "
      f"{shifted['window']}: {finals}. Online / best single option ({shifted['best_fixed']}): "
      f"{shifted['online_vs_best_fixed']:.3f}; frozen: {shifted['frozen_vs_best_fixed']:.3f}."
      "\n\n![shifted domain](figure_shifted_domain.png)\n"
  )


def _partial_collection_note(collection: dict | None) -> str:
  if not collection or collection["complete"]:
    return ""
  return (
      f"**Partial collection**: the policy and the experiments used "
      f"{collection['collected_queries']} of {collection['num_queries']} collected queries "
      f"(missing {', '.join(collection['missing_shards'])}).\n"
  )


def _shortfalls_markdown(notes: list[str]) -> str:
  if not notes:
    return "Every check below holds.\n"
  return (
      "**Falls short** (measured, reported as is):\n\n"
      + "\n".join(f"- {note}" for note in notes)
      + "\n"
  )
