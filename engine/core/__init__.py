"""The step loop on the MLX thread: worker (the thread), engine_core (the loop),
scheduler (decides), model_runner (executes), output_processor (streams tokens
back), sequence (one request's state), admission (the bounded queue)."""
