"""Library side of the benchmark suite in bench/: cost counting, machine peaks, GPU telemetry and
the claims report. Kept in the package so that it is unit-tested like the rest."""
