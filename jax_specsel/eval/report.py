"""Tables laid out like the paper's (Tables 1, 3, 4), choice histograms, and the Figure 2 / 3 plots."""

from __future__ import annotations

import json
import os

ORDER_FIRST = ("autoregressive",)
ORDER_LAST = ("policy_greedy", "policy_dynamic", "policy_adaptive")


def _ordered(options) -> list[str]:
  middle = [o for o in options if o not in ORDER_FIRST + ORDER_LAST]
  return [o for o in ORDER_FIRST if o in options] + middle + [o for o in ORDER_LAST if o in options]


def results_table(result: dict) -> str:
  """Markdown: one row per option; per domain quality, speedup (ms/token ± spread), accept %."""
  domains = list(result["domains"])
  options = _ordered(next(iter(result["domains"].values())))
  head = "| option | " + " | ".join(f"{d}: quality | {d}: speedup (ms/token) | {d}: accept %" for d in domains)
  head += " | average speedup |\n|---" + "|---" * (3 * len(domains) + 1) + "|\n"
  lines = []
  for option in options:
    cells, speedups = [], []
    for d in domains:
      row = result["domains"][d][option]
      accept = "-" if row["acceptance_rate"] is None else f"{100 * row['acceptance_rate']:.1f}"
      quality = "-" if row["quality"] is None else f"{row['quality']:.2f}"
      cells += [quality, f"{row['speedup']:.2f}x ({row['ms_per_token']:.3f} ± "
                f"{row['ms_per_token_spread']:.3f})", accept]
      speedups.append(row["speedup"])
    lines.append(f"| {option} | " + " | ".join(cells) + f" | {sum(speedups) / len(speedups):.2f}x |")
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
    ax.axhline(ms, linestyle=_SINGLE_STYLES[i % len(_SINGLE_STYLES)], linewidth=1.4,
               color=colours[option], label=f"{option} ({ms:.3f} ms)")
    ax.annotate(option, xy=(1.0, ms), xycoords=("axes fraction", "data"), xytext=(3, 0),
                textcoords="offset points", fontsize=7, color=colours[option], va="center")
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
    left.plot(alphas, [p["shares"].get(option, 0.0) for p in sweep["points"]], marker="o",
              label=option, color=colours[option])
  left.set_xlabel("alpha (weight of alignment, eq. 2)")
  left.set_ylabel("share of queries")
  left.legend()
  right.plot(alphas, [p["ms_per_token"] for p in sweep["points"]], marker="o", color="black",
             label="policy")
  _finish_ms_per_token_axes(right, sweep["single_options"], "alpha")
  _save(fig, path)


def plot_sample_efficiency(curve: dict, path: str) -> None:
  """Figure 3: ms/token of the policy versus training examples (log x), single options as lines."""
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  sizes = [p["examples"] for p in curve["points"]]
  ax.errorbar(sizes, [p["ms_per_token"] for p in curve["points"]],
              yerr=[p.get("ms_per_token_spread", 0.0) for p in curve["points"]], marker="o",
              color="black", label="policy")
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
