"""Paper Table 6: LLaMA-2-13B-chat early exits at layers 8/16/24/32 (one shared LM head) on
Alpaca and TriviaQA, with and without the autoregressive option.

Memory: 13B parameters: ~26 GB bfloat16 + caches (early exits share the target's weights):
one A100-40GB is tight, an 80 GB GPU comfortable.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.target = "meta-llama/Llama-2-13b-chat-hf"
  config.dtype = "bfloat16"
  config.drafters = {f"layer{k}": f"early_exit:{k}" for k in (8, 16, 24, 32)}
  config.tasks = ("alpaca", "triviaqa")
  config.data_files = {}
  config.data_dir = ""  # or a directory of <task>.jsonl files (--config.data_dir=DIR)
  config.train_split, config.test_split = "train", "train"  # Alpaca has only a train split
  config.train_per_task = 10_000
  config.test_per_task = 500
  config.seed = 0
  config.output_dir = "runs/table6"
  config.max_new_tokens = 128
  config.collect_batch_size = 8
  config.shard_size = 1024
  config.alpha = 0.5
  config.cost_unit = 1e9
  config.autoregressive_option = True  # the table's last block; False for the middle block
  config.trainer = "paper"  # the policy-training config: "paper" (plain REINFORCE) or "default"
  config.gamma = 7
  config.temperature = 1.0
  config.eval_seeds = (0, 1, 2, 3, 4)
  config.alphas = (0.0, 0.5, 1.0)
  config.sample_sizes = (100, 1_000, 10_000)
  return config
