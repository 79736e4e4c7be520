"""Schedule: the deterministic global mixture schedule (mixture, permutation, run_length), each
rank's slice of it (stream), packing into sequences (packing), collation into the typed
MicroBatch (collate, batch, labels), the evaluation batches (eval_batches) and token accounting."""
