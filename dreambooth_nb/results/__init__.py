"""After a run: renders, grids, measurements and the suggested snapshot, sweeps, export, the Hub."""
