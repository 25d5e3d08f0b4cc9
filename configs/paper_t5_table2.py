"""Paper Table 2 and Figure 2: drafters of different sizes and alignment on XSum (Flan-T5-XXL target).

Memory: as Table 1 (~24 GB bfloat16 on one 80 GB GPU) plus Flan-T5-base (~0.5 GB).
"""

from configs import paper_t5_table1


def get_config():
  config = paper_t5_table1.get_config()
  config.drafters = {
      "t5-small": "google-t5/t5-small",
      "t5-small-xsum": "jaeheekim/t5-small-xsum",
      "flan-t5-small": "google/flan-t5-small",
      "flan-t5-base": "google/flan-t5-base",
  }
  config.tasks = ("xsum",)
  config.train_per_task = 200_000
  config.alpha = 0.5  # Figure 2 sweeps it: config.alphas
  config.output_dir = "runs/table2"
  return config
