"""Distillation: the student's loss against a teacher's logits, and the student's shape."""

from __future__ import annotations


def distillation_loss(student_logits, teacher_logits, labels, hard_loss, temperature: float, alpha: float):
    """alpha x T^2 x KL(teacher || student), both softened by T, + (1 - alpha) x the data's cross-entropy.

    The KL term is averaged over the positions whose next token is a training target (labels shifted
    as the causal LM loss shifts them; -100 marks the ones it skips). T^2 keeps its gradients on the
    scale of the cross-entropy's whatever T is (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    targets = labels[:, 1:] != -100
    student = student_logits[:, :-1][targets].float() / temperature
    teacher = teacher_logits[:, :-1][targets].float() / temperature
    soft = F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean"
    )
    return alpha * temperature**2 * soft + (1 - alpha) * hard_loss


def load_teacher(directory: str, device):
    """The teacher, frozen and in eval mode, on the student's device."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def student_shape(teacher_config, layers_kept: float, width_kept: float, multiple: int = 16) -> dict[str, int]:
    """A smaller Llama of the teacher's head size: ``layers_kept`` of its layers (at least one) and
    ``width_kept`` of its width (whole heads, at least one; the MLP scaled alike, a multiple of ``multiple``)."""
    head_dim = (
        getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // teacher_config.num_attention_heads
    )
    heads = max(1, round(width_kept * teacher_config.num_attention_heads))
    hidden = heads * head_dim
    width = max(
        multiple, round(teacher_config.intermediate_size * hidden / teacher_config.hidden_size / multiple) * multiple
    )
    return {
        "num_layers": max(1, round(layers_kept * teacher_config.num_hidden_layers)),
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": heads,
        "intermediate_size": width,
    }
