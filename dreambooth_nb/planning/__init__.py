"""Before a run: the memory and disk plans, the memory savers, the fastest settings that fit."""
