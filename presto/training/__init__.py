"""What every training stage shares: resumable state on disk, progress lines, divergence checks."""
