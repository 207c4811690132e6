"""Small random Hugging Face models for tests: norms and biases randomised too, so nothing sits at its init."""
import torch


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Norm weights ~ 1 + N(0, 0.2), biases ~ N(0, 0.2), everything else ~ N(0, 0.1), in place."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(0.2 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.1)
    return model
