"""Training and measuring NXTP: the synthetic scenes (`scenes`), your own labelled images (`data`), the
training loop (`train`), the metrics (`evaluate`) and the experiments of lessons 10 and 11 (`ablations`)."""
