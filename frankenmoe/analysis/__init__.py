"""What a checkpoint does: routing of prompts (their statistics, labels, the routing check and `route`), inspect,
verify, evaluate (token windows, the models compared, perplexity) and plots."""
