"""The limiter: per-key token (TPM) and request (RPM) windows, reserve then reconcile."""
