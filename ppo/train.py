"""Train PPO (Schulman et al., 2017) on a gymnasium classic-control task; defaults solve CartPole.

    python train.py                              # CartPole-v1, 100k steps, 15-20 s on a 2-core CPU
    python train.py --env-id Acrobot-v1 --steps 300000
    python train.py --env-id Pendulum-v1 ...     # continuous actions: see README.md for the flags

Each iteration: collect num_steps x num_envs transitions with the current policy (rollout), compute
GAE advantages (model.gae), then run update_epochs passes of shuffled minibatches over the clipped
objective (ppo_update, model.ppo_loss).
"""
import csv
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from model import Agent, gae, ppo_loss
from plumbing import (
    Clock,
    MetricsLog,
    config_dict,
    config_from_checkpoint,
    load_checkpoint,
    make_out_dir,
    parse_config,
    require,
    rng_state,
    save_checkpoint,
    set_rng_state,
    setup,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


@dataclass
class Config:
    """Train PPO on a gymnasium classic-control task; the defaults solve CartPole-v1."""
    # environment and rollouts
    env_id: str = "CartPole-v1"  # gymnasium id with a flat Box observation space
    steps: int = 100_000  # environment steps to train for, all environments together
    num_envs: int = 8  # parallel environments (a SyncVectorEnv), N
    num_steps: int = 32  # steps per environment per rollout, T
    # the update (Algorithm 1)
    num_minibatches: int = 1  # minibatches per epoch over one rollout
    update_epochs: int = 10  # passes over each rollout (K in the paper)
    lr: float = 1e-3  # Adam learning rate
    anneal_lr: bool = True  # decay the learning rate linearly to 0 over the run
    gamma: float = 0.98  # discount factor
    gae_lambda: float = 0.8  # lambda of GAE (Eq. 11)
    clip_coef: float = 0.2  # epsilon of the clipped objective (Eq. 7)
    clip_vloss: bool = False  # clip the value update like the policy's (OpenAI baselines)
    ent_coef: float = 0.0  # c2, weight of the entropy bonus (Eq. 9)
    vf_coef: float = 0.5  # c1, weight of the value loss (Eq. 9)
    max_grad_norm: float = 0.5  # clip the global gradient norm to this
    target_kl: float | None = None  # stop an update's epochs once the approximate KL exceeds this
    # the agent
    hidden_size: int = 64  # units in each of the two hidden layers
    norm_obs: bool = False  # normalize observations by running mean and std (continuous control)
    reward_scale: float = 1.0  # multiply rewards by this for learning
    init_log_std: float | None = None  # continuous actions: initial log std of the policy (0)
    # the run
    eval_episodes: int = 100  # deterministic evaluation episodes after training (0: none)
    plot: str = "ppo_learning_curve.png"  # learning-curve PNG, written into --out-dir ('': none)
    out_dir: str = "runs/ppo"  # ckpt.pt, metrics.csv, episodes.csv and the plot go here
    data_dir: str = os.environ.get("DATA_DIR", "data")  # unused: gymnasium simulates the tasks
    max_minutes: float = 0.0  # stop after this many minutes, evaluation included (0: off)
    resume: str | None = None  # continue from this checkpoint exactly (its flags are reused)
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"  # a 64-unit MLP is fastest on the CPU
    threads: int = 1  # CPU threads for torch: one is fastest for tiny networks (0: torch's default)
    seed: int = 1  # seeds Python, NumPy, torch and the environments
    compile: bool = False  # torch.compile the agent's act and evaluate_actions
    wandb: bool = False  # also log to Weights & Biases (WANDB_MODE=offline works)

    signed = ("init_log_std",)  # the one number that may be negative

    def __post_init__(self):
        for name in ["steps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
                     "hidden_size"]:
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        rollout_size = self.num_envs * self.num_steps
        require(self.num_minibatches <= rollout_size,
                "--num-minibatches cannot exceed --num-envs x --num-steps")
        require(self.steps >= rollout_size,
                f"--steps {self.steps} is less than one rollout (--num-envs x --num-steps)")
        require(self.plot == os.path.basename(self.plot), "--plot is a file name inside --out-dir")
        require(self.env_id in gym.registry, f"unknown --env-id {self.env_id!r}; try CartPole-v1, "
                f"Acrobot-v1, MountainCar-v0, Pendulum-v1")
        try:
            env = gym.make(self.env_id)
        except Exception as e:  # e.g. a Box2D or MuJoCo id whose extra packages are missing
            raise ValueError(f"--env-id {self.env_id} cannot be built here: "
                             f"{str(e).splitlines()[0]}")
        obs_space, action_space = env.observation_space, env.action_space
        env.close()
        require(isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1,
                f"--env-id {self.env_id} has observations {obs_space}; the MLP needs a flat Box")
        require(isinstance(action_space, (gym.spaces.Discrete, gym.spaces.Box)),
                f"--env-id {self.env_id} has actions {action_space}; need Discrete or Box")
        discrete = isinstance(action_space, gym.spaces.Discrete)
        require(not (discrete and self.init_log_std is not None),
                f"--init-log-std is for continuous actions; {self.env_id} has discrete actions")


# Flags that may differ from the checkpoint's on --resume; all others are taken from the checkpoint.
RESUME_OVERRIDES = ["steps", "out_dir", "device", "wandb", "plot", "eval_episodes", "resume",
                    "max_minutes", "threads"]
COLUMNS = ["iteration", "step", "time", "return", "length", "policy_loss", "value_loss", "entropy",
           "approx_kl", "clip_frac", "explained_var", "lr", "sps"]


def rollout(envs, agent, state, num_steps, reward_scale, device):
    """Run the policy for num_steps steps in every environment; returns (T, N) arrays and the
    episodes that finished.

    `state` carries what survives between rollouts: the current observation, which environments
    ended their episode on the previous step, and the return and length of the episodes in
    progress. gymnasium 1.x vector environments reset an environment on the step *after* its episode
    ended: that step ignores the action, returns reward 0 and the first observation of the next
    episode. It is not a transition of the MDP, so it is marked valid = 0 here and left out of the
    update.
    """
    T, N = num_steps, envs.num_envs
    b = {k: np.zeros((T, N), dtype=np.float32)
         for k in ["rewards", "terminations", "dones", "valid"]}
    b["obs"] = np.zeros((T, N) + envs.single_observation_space.shape, dtype=np.float32)
    b["actions"] = np.zeros((T, N) + envs.single_action_space.shape, dtype=np.float32)
    episodes = []  # (return, length) of each episode that ended in this rollout
    for t in range(T):
        action = act(agent, state["obs"], False, device)
        # the Gaussian is unbounded: clip what the environment sees, learn from the sampled action
        env_action = np.clip(action, envs.single_action_space.low, envs.single_action_space.high) \
            if agent.continuous else action
        next_obs, reward, terminated, truncated, _ = envs.step(env_action)
        valid = ~state["prev_done"]
        done = terminated | truncated
        b["obs"][t], b["actions"][t], b["valid"][t] = state["obs"], action, valid
        b["rewards"][t] = reward * reward_scale
        b["terminations"][t], b["dones"][t] = terminated, done
        state["episode_return"] += reward * valid  # raw rewards: what the task scores
        state["episode_length"] += valid
        for i in np.flatnonzero(done):
            episodes.append((float(state["episode_return"][i]), int(state["episode_length"][i])))
            state["episode_return"][i], state["episode_length"][i] = 0.0, 0
        state["obs"], state["prev_done"] = next_obs, done
    # theta_old is fixed during the rollout: its log-probabilities and values in one batched call
    with torch.no_grad():
        log_probs, _, values = agent.evaluate_actions(
            torch.from_numpy(b["obs"]).flatten(0, 1).to(device),
            torch.from_numpy(b["actions"]).flatten(0, 1).to(device))
        next_obs = torch.as_tensor(state["obs"], dtype=torch.float32, device=device)
        next_value = agent.get_value(next_obs)
    b["log_probs"] = log_probs.view(T, N).cpu().numpy()
    b["values"] = values.view(T, N).cpu().numpy()
    b["next_value"] = next_value.cpu().numpy()
    return b, episodes


def ppo_update(agent, optimizer, b, cfg):
    """update_epochs passes of shuffled minibatches over a rollout's valid steps (Algorithm 1)."""
    advantages, returns = gae(b["rewards"], b["values"], b["next_value"], b["terminations"],
                              b["dones"], cfg.gamma, cfg.gae_lambda)  # NumPy: faster for tiny ops
    device = next(agent.parameters()).device
    b = {k: torch.from_numpy(b[k]).to(device)
         for k in ["obs", "actions", "log_probs", "values", "valid"]}
    advantages = torch.from_numpy(advantages).to(device)
    returns = torch.from_numpy(returns).to(device)
    keep = b["valid"].flatten().bool()  # drop the autoreset steps: not transitions of the MDP
    obs, actions = b["obs"].flatten(0, 1)[keep], b["actions"].flatten(0, 1)[keep]
    log_probs, values = b["log_probs"].flatten()[keep], b["values"].flatten()[keep]
    advantages, returns = advantages.flatten()[keep], returns.flatten()[keep]
    n = obs.shape[0]
    minibatch_size = -(-n // cfg.num_minibatches)
    for _ in range(cfg.update_epochs):
        for mb in torch.randperm(n, device=obs.device).split(minibatch_size):
            new_log_prob, entropy, new_value = agent.evaluate_actions(obs[mb], actions[mb])
            mb_adv = advantages[mb]
            if len(mb) > 1:  # advantage normalization per minibatch
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            loss, stats = ppo_loss(new_log_prob, log_probs[mb], mb_adv, new_value, values[mb],
                                   returns[mb], entropy, cfg.clip_coef, cfg.vf_coef, cfg.ent_coef,
                                   cfg.clip_vloss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
        if cfg.target_kl is not None and stats["approx_kl"] > cfg.target_kl:
            break
    var_y = returns.var()
    stats["explained_var"] = float("nan") if var_y == 0 else \
        (1 - (returns - values).var() / var_y).item()
    return stats


def act(agent, obs, deterministic, device):
    """The policy's actions for a batch of observations: a sample, or its mode (argmax or mean)."""
    with torch.no_grad():
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return agent.act(obs, deterministic).cpu().numpy()


def evaluate(agent, env_id, episodes, seed, device="cpu", deterministic=True, clock=None):
    """Undiscounted returns of `episodes` episodes, one per environment, all run side by side (only
    those that finished, should the clock run out first)."""
    envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="sync")
    space = envs.single_action_space
    obs, _ = envs.reset(seed=seed)
    returns, running = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while running.any() and not (clock and clock.done()):
        action = act(agent, obs, deterministic, device)
        if agent.continuous:
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * running  # each environment's first episode only
        running &= ~(terminated | truncated)
    envs.close()
    return returns[~running]


# ------------------------------------------------------------------------------ the run's plumbing
def load_config(argv):
    """The flags; on --resume the checkpoint's, but RESUME_OVERRIDES from the command line."""
    cfg = parse_config(Config, argv)
    if not cfg.resume:
        return cfg, None
    ckpt = load_checkpoint(cfg.resume, "ppo", keys=["config", "model", "optimizer", "step",
                                                     "iteration", "seconds", "env", "rng"])
    overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES}
    return config_from_checkpoint(Config, ckpt, cfg.resume, **overrides), ckpt


def agent_args(envs, cfg):
    """The Agent's arguments for these environments (the checkpoint keeps them for sample.py)."""
    space = envs.single_action_space
    continuous = isinstance(space, gym.spaces.Box)
    return {"obs_dim": envs.single_observation_space.shape[0], "continuous": continuous,
            "action_dim": space.shape[0] if continuous else int(space.n),
            "hidden_size": cfg.hidden_size, "norm_obs": cfg.norm_obs,
            "init_log_std": cfg.init_log_std or 0.0}


def get_env_state(envs):
    """Everything a classic-control sub-environment needs to continue its episode, as plain data."""
    return [{"state": np.asarray(env.unwrapped.state).tolist(),
             "steps_beyond_terminated": getattr(env.unwrapped, "steps_beyond_terminated", None),
             "elapsed_steps": env.get_wrapper_attr("_elapsed_steps"),
             "np_random": json.dumps(env.unwrapped.np_random.bit_generator.state)}
            for env in envs.envs]


def set_env_state(envs, states, prev_done):
    for env, s in zip(envs.envs, states):
        env.unwrapped.state = np.array(s["state"], dtype=np.asarray(env.unwrapped.state).dtype)
        if s["steps_beyond_terminated"] is not None:
            env.unwrapped.steps_beyond_terminated = s["steps_beyond_terminated"]
        env.set_wrapper_attr("_elapsed_steps", s["elapsed_steps"])
        env.unwrapped.np_random.bit_generator.state = json.loads(s["np_random"])
    envs._autoreset_envs = prev_done.copy()  # the vector env resets these on the next step


def start(envs, cfg, ckpt, agent, optimizer):
    """(rollout state, step, iteration): fresh environments, or exactly where the checkpoint was."""
    obs, _ = envs.reset(seed=cfg.seed)
    state = {"obs": obs, "prev_done": np.zeros(cfg.num_envs, dtype=bool),
             "episode_return": np.zeros(cfg.num_envs),
             "episode_length": np.zeros(cfg.num_envs, dtype=np.int64)}
    if ckpt is None:
        return state, 0, 0
    agent.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state = {k: v.numpy() for k, v in ckpt["env"]["rollout_state"].items()}
    set_env_state(envs, ckpt["env"]["sub_envs"], state["prev_done"])
    set_rng_state(ckpt["rng"])
    return state, ckpt["step"], ckpt["iteration"]


def save(path, cfg, agent, optimizer, envs, state, step, iteration, clock):
    save_checkpoint(path, {
        "folder": "ppo", "config": config_dict(cfg), "model_args": agent_args(envs, cfg),
        "model": agent.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "iteration": iteration, "seconds": clock.seconds, "rng": rng_state(),
        "env": {"sub_envs": get_env_state(envs),
                "rollout_state": {k: torch.as_tensor(v) for k, v in state.items()}}})


def log_iteration(log, episodes_log, bar, iteration, step, seconds, sps, episodes, stats, lr):
    ep_return = np.mean([r for r, _ in episodes]) if episodes else float("nan")
    ep_length = np.mean([n for _, n in episodes]) if episodes else float("nan")
    log.log(iteration=iteration, step=step, time=round(seconds, 3), length=ep_length, lr=lr,
            sps=round(sps), **{"return": ep_return}, **stats)
    for episode_return, length in episodes:
        episodes_log.log(step=step, length=length, **{"return": episode_return})
    if episodes:
        bar.set_postfix(ret=f"{ep_return:.1f}", kl=f"{stats['approx_kl']:.4f}", sps=f"{sps:.0f}")


def plot_learning_curve(episodes_csv, path, env_id):
    with open(episodes_csv) as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    returns = np.array([float(r["return"]) for r in rows])
    if len(returns) == 0:
        print(f"no episode finished: no learning curve written to {path}")
        return
    window = min(20, len(returns))
    smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, returns, ".", ms=2, alpha=0.3, color="tab:blue", label="episode")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"mean of last {window}")
    threshold = gym.spec(env_id).reward_threshold
    if threshold is not None:
        ax.axhline(threshold, ls="--", color="gray", lw=1, label=f"solved ({threshold:g})")
    ax.set(xlabel="environment steps", ylabel="episodic return", title=f"PPO on {env_id}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def final_evaluation(agent, cfg, device, clock, log, step):
    if cfg.eval_episodes == 0 or clock.done():  # no time left: sample.py evaluates the checkpoint
        return np.array([])
    returns = evaluate(agent, cfg.env_id, cfg.eval_episodes, cfg.seed + 10_000, device, clock=clock)
    if len(returns) == 0:
        print("evaluation: no episode finished within --max-minutes")
        return returns
    print(f"evaluation over {len(returns)} deterministic episodes: "
          f"{returns.mean():.1f} +- {returns.std():.1f}")
    if log.wandb:
        log.wandb.log({"eval_return": returns.mean()}, step=step)
    return returns


def main(argv=None):
    cfg, ckpt = load_config(argv)
    _, _, _, device = setup(cfg)  # threads, seeds, device
    envs = gym.make_vec(cfg.env_id, num_envs=cfg.num_envs, vectorization_mode="sync")
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP, "see rollout()"
    agent = Agent(**agent_args(envs, cfg)).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5,
                                 fused=device.type != "mps")
    state, step, iteration = start(envs, cfg, ckpt, agent, optimizer)
    if cfg.compile:  # compile the two hot methods in place: the state_dict keeps its plain names
        agent.act = torch.compile(agent.act)
        agent.evaluate_actions = torch.compile(agent.evaluate_actions)
    out_dir = make_out_dir(cfg.out_dir)
    log = MetricsLog(out_dir, COLUMNS, resume=ckpt is not None, project="ppo",
                     wandb_config=config_dict(cfg) if cfg.wandb else None,
                     run_name=f"{cfg.env_id}-seed{cfg.seed}")
    episodes_log = MetricsLog(out_dir, ["step", "return", "length"], resume=ckpt is not None,
                              filename="episodes.csv")  # one row per episode: the learning curve

    batch_size = cfg.num_envs * cfg.num_steps
    num_iterations = cfg.steps // batch_size
    clock = Clock(cfg.max_minutes, ckpt["seconds"] if ckpt else 0.0)
    start_time, start_step = time.time(), step
    bar = tqdm(total=num_iterations, initial=iteration, desc=f"PPO {cfg.env_id}")
    while iteration < num_iterations and not clock.done():
        lr = cfg.lr * (1 - iteration / num_iterations) if cfg.anneal_lr else cfg.lr  # annealing
        for group in optimizer.param_groups:
            group["lr"] = lr
        b, episodes = rollout(envs, agent, state, cfg.num_steps, cfg.reward_scale, device)
        step += batch_size
        stats = ppo_update(agent, optimizer, b, cfg)
        if agent.norm_obs:  # between rollouts only: old and new log-probs see the same inputs
            agent.update_obs_stats(torch.from_numpy(b["obs"]).flatten(0, 1).to(device))
        iteration += 1
        seconds = time.time() - start_time
        log_iteration(log, episodes_log, bar, iteration, step, seconds,
                      (step - start_step) / seconds, episodes, stats, lr)
        bar.update()
    bar.close()
    episodes_log.close()
    train_time = time.time() - start_time
    save(out_dir / "ckpt.pt", cfg, agent, optimizer, envs, state, step, iteration, clock)
    envs.close()
    print(f"trained {step} steps in {train_time:.1f} s ({(step - start_step) / train_time:.0f} "
          f"steps/s); saved {out_dir / 'ckpt.pt'}")
    if iteration < num_iterations:
        print(f"stopped early (--max-minutes or Ctrl-C): --resume {out_dir / 'ckpt.pt'} continues")
    if cfg.plot:
        plot_learning_curve(out_dir / "episodes.csv", out_dir / cfg.plot, cfg.env_id)
    returns = final_evaluation(agent, cfg, device, clock, log, step)
    log.close()
    clock.close()
    return agent, returns


if __name__ == "__main__":
    main()
