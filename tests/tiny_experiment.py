"""The cluster, model and precision of a tiny CPU experiment, as `.nemo` text (2-space indented members
of an `experiment` block), for tests that need a clean experiment around the lines they probe."""

TINY_CPU = """\
  cluster {
    gpu = CPU
    nodes = 1
    gpus_per_node = 2
  }
  model tiny {
    layers = 2
    hidden = 64
    heads = 2
    ffn_hidden = 256
    vocab = 256
    seq_length = 64
  }
  precision = fp32
"""
