"""The closed bottom layer every command stands on: errors and their one-line reports, atomic files,
checkpoint files, run folders, locks and logs, data provenance, torchrun setup, CPU threads, devices and
the on-disk layout. Nothing here imports a module above it, and this file imports nothing (no torch), so
`runtime.threads` can set OpenMP's wait policy before torch loads."""
