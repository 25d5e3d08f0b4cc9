"""Paper Tables 3 and 4: the autoregressive option, with GSM8K (where only the target is aligned).

Memory: as Table 1 (~24 GB bfloat16 on one 80 GB GPU).
"""

from configs import paper_t5_table1


def get_config():
  config = paper_t5_table1.get_config()
  config.tasks = ("iwslt2017-en-de", "xsum", "gsm8k")
  config.train_per_task = 7_000  # GSM8K has ~7.5k training questions: sizes matched across tasks
  config.autoregressive_option = True
  config.alpha = 0.5  # the paper's setting with the autoregressive option
  config.output_dir = "runs/table3_4"
  return config
