"""Real CT with expert masks: loaders (VerSe layout and the real-spine pack) and the split."""
