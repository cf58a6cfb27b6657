"""Proximal Policy Optimization (Schulman et al., 2017, arXiv:1707.06347): actor-critic and maths.

In the paper's order: the policy pi_theta(a|s) and the value V(s) (the MLPs of Sec. 6.1), the
log-probability and entropy of the two action distributions, the probability ratio r_t(theta)
(Eq. 6), the clipped surrogate L^CLIP (Eq. 7), the combined objective L^{CLIP+VF+S} (Eq. 9) and
generalized advantage estimation (Eq. 11-12). train.py collects the rollouts and runs the
optimisation loop around these pieces.
"""
import math

import torch
import torch.nn as nn


def layer_init(layer, std=math.sqrt(2), bias=0.0):
    """Orthogonal weights and zero biases, as in OpenAI baselines' PPO (the paper's experiments)."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim, hidden_size, out_dim, out_std):
    """Two tanh layers (Sec. 6.1: "two hidden layers of 64 units, and tanh nonlinearities")."""
    return nn.Sequential(layer_init(nn.Linear(in_dim, hidden_size)), nn.Tanh(),
                         layer_init(nn.Linear(hidden_size, hidden_size)), nn.Tanh(),
                         layer_init(nn.Linear(hidden_size, out_dim), std=out_std))


def categorical_log_prob_entropy(logits, actions):
    """log pi(a|s) and H[pi(.|s)] of a softmax policy. logits (B, A), actions (B,) -> (B,), (B,)."""
    log_p = logits - logits.logsumexp(-1, keepdim=True)  # (B, A) log-softmax
    log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_prob, entropy


def gaussian_log_prob_entropy(mean, log_std, actions):
    """log pi(a|s) and H of a diagonal Gaussian, summed over action dimensions.
    mean, actions (B, D) -> (B,), (B,)."""
    log_prob = -0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - math.log(2 * math.pi) / 2
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).expand_as(mean)
    return log_prob.sum(-1), entropy.sum(-1)


class Agent(nn.Module):
    """Separate policy and value networks, each a 64-64 tanh MLP (Sec. 6.1: no parameter sharing on
    the continuous-control tasks, so the value loss cannot pull the policy's features around).

    Discrete actions: the policy outputs logits of a categorical distribution. Continuous actions:
    it outputs the mean of a diagonal Gaussian whose log standard deviation is a free parameter,
    independent of the state (Sec. 6.1). Optionally observations are normalized by running
    statistics kept in buffers, so the checkpoint carries them and sample.py sees what training saw.
    """

    def __init__(self, obs_dim, action_dim, continuous, hidden_size=64, norm_obs=False,
                 init_log_std=0.0):
        super().__init__()
        self.continuous, self.norm_obs = continuous, norm_obs
        self.critic = mlp(obs_dim, hidden_size, 1, out_std=1.0)
        self.actor = mlp(obs_dim, hidden_size, action_dim, out_std=0.01)  # near-uniform at first
        if continuous:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_var", torch.ones(obs_dim))
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update_obs_stats(self, obs):
        """Merge a batch (B, obs_dim) into the running mean and variance (Chan et al.'s formula)."""
        batch_mean, batch_var, n = obs.mean(0), obs.var(0, unbiased=False), obs.shape[0]
        total = self.obs_count + n
        delta = batch_mean - self.obs_mean
        m2 = self.obs_var * self.obs_count + batch_var * n + delta ** 2 * self.obs_count * n / total
        self.obs_mean += (delta * n / total).float()
        self.obs_var.copy_(m2 / total)
        self.obs_count.copy_(total)

    def normalize(self, obs):
        if not self.norm_obs:
            return obs
        return ((obs - self.obs_mean) / (self.obs_var + 1e-8).sqrt()).clamp(-10, 10)

    def get_value(self, obs):
        return self.critic(self.normalize(obs)).squeeze(-1)  # (B,)

    def act(self, obs, deterministic=False):
        """Sample a ~ pi(.|s) for a batch of observations, or take the policy's mode.
        (B, obs_dim) -> (B,) or (B, D)."""
        out = self.actor(self.normalize(obs))  # (B, A) logits, or (B, D) Gaussian means
        if self.continuous:
            return out if deterministic else out + self.log_std.exp() * torch.randn_like(out)
        if deterministic:
            return out.argmax(-1)
        return torch.multinomial(out.softmax(-1), 1).squeeze(-1)

    def evaluate_actions(self, obs, actions):
        """log pi(a|s), entropy of pi(.|s) and V(s) for a batch of states and actions, each (B,)."""
        x = self.normalize(obs)
        out = self.actor(x)
        if self.continuous:
            log_prob, entropy = gaussian_log_prob_entropy(out, self.log_std, actions)
        else:
            log_prob, entropy = categorical_log_prob_entropy(out, actions)
        return log_prob, entropy, self.critic(x).squeeze(-1)


def ppo_loss(new_log_prob, old_log_prob, advantages, new_value, old_value, returns, entropy,
             clip_coef=0.2, vf_coef=0.5, ent_coef=0.0, clip_vloss=False):
    """Minus the objective L^{CLIP+VF+S} of Eq. 9, to be minimised, and diagnostics. Inputs (B,)."""
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()  # r_t(theta) = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t), Eq. 6
    surrogate = ratio * advantages  # L^CPI, Eq. 6
    clipped = ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages
    policy_loss = -torch.min(surrogate, clipped).mean()  # -L^CLIP, Eq. 7
    value_loss = (new_value - returns) ** 2  # L^VF = (V_theta(s_t) - V_t^targ)^2, Eq. 9
    if clip_vloss:  # baselines' extra: keep V within clip_coef of its old value, like the policy
        value_clipped = old_value + (new_value - old_value).clamp(-clip_coef, clip_coef)
        value_loss = torch.max(value_loss, (value_clipped - returns) ** 2)
    value_loss = 0.5 * value_loss.mean()
    entropy = entropy.mean()  # S[pi_theta](s_t), Eq. 9
    loss = policy_loss + vf_coef * value_loss - ent_coef * entropy  # -L^{CLIP+VF+S}, Eq. 9
    with torch.no_grad():
        approx_kl = ((ratio - 1) - log_ratio).mean()  # unbiased, non-negative KL(old || new)
        clip_frac = ((ratio - 1).abs() > clip_coef).float().mean()
    return loss, {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                  "entropy": entropy.item(), "approx_kl": approx_kl.item(),
                  "clip_frac": clip_frac.item()}


def gae(rewards, values, next_value, terminations, dones, gamma, gae_lambda):
    """Generalized advantage estimates A_t (Eq. 11-12) and value targets A_t + V(s_t) over a (T, N)
    rollout.

    values[t] = V(s_t) and next_value = V(s_T), the state after the last step. terminations[t] = 1
    when step t reached a terminal state: nothing follows it, so it is not bootstrapped.
    dones[t] = 1 when the episode ended at step t for any reason (terminated or truncated by the
    time limit): the sum of Eq. 11 stops there. With gymnasium's next-step autoreset, the
    observation after a truncated step is the real final state, so values[t + 1] (or next_value) is
    V(s_final) and the truncation is bootstrapped with no extra work. The step after an episode end
    (the autoreset step) gets a meaningless estimate here; train.py leaves it out.
    """
    advantages, last = 0 * rewards, 0 * next_value  # numpy arrays or torch tensors alike
    for t in reversed(range(rewards.shape[0])):
        next_v = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * (1 - terminations[t]) * next_v - values[t]  # delta_t, Eq. 12
        # A_t = delta_t + (gamma lambda) A_{t+1}, Eq. 11, the sum stopped at the episode's end
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values
