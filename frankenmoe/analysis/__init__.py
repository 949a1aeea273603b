"""What a checkpoint does: routing of prompts, the routing check, inspect, verify, evaluate and plots."""
