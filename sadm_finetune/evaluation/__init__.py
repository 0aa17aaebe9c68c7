"""sadm-eval: sampling, reference sets, features, metrics (FID, KID, precision/recall) and the structure probe."""
