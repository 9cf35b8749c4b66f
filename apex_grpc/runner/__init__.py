"""Runner: StepPlan -> tensors -> model -> sampler -> StepResult."""
