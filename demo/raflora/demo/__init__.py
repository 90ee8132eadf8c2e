"""The main job: a real federated LoRA fine-tuning run that shows rank collapse and its cure."""
