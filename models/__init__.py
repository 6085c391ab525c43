"""Plain torch: networks, SSL objectives, VAE, denoisers, noise schedules, samplers, EMA. No I/O, no orchestration."""
