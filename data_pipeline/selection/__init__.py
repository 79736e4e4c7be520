"""Selection: which prepared samples a run trains on and which it holds out (split), and the
first occurrence of exact duplicates (dedup), as one view over a prepared source."""
