"""Runner: StepPlan -> InputBatch (ids, positions, BatchLayout) -> the strategy's executor ->
sampler -> StepResult."""
