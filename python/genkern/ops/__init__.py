"""torch.library registration of every genkern op (namespace `genkern::`) and the public functions."""
