"""Scheduling: the StepPlan hand-off, the iteration scheduler and the strategy choosers."""
