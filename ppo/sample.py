"""Evaluate a trained PPO agent and record a GIF of one episode.

    python sample.py                                  # runs/ppo/ckpt.pt, 100 deterministic episodes, GIF
    python sample.py --stochastic --episodes 20       # sample actions from the policy instead of its mode
"""
import argparse
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

from model import Agent

IMAGES = Path(__file__).resolve().parent.parent / "images"


def get_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: --device {name} is not available on this machine; use --device cpu")
    return name


def load_checkpoint(path, device):
    """A checkpoint written by this folder's train.py, or one line saying why not."""
    if not os.path.isfile(path):
        sys.exit(f"error: checkpoint {path} does not exist; train one with `python train.py`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        sys.exit(f"error: cannot read checkpoint {path} (truncated or corrupt?): {type(e).__name__}")
    if not isinstance(ckpt, dict) or ckpt.get("folder") != "ppo":
        found = ckpt.get("folder") if isinstance(ckpt, dict) else type(ckpt).__name__
        sys.exit(f"error: {path} is not a ppo/ checkpoint (it belongs to {found!r})")
    return ckpt


def act(agent, obs, deterministic, device):
    """The policy's action for a batch of observations: its mode (argmax or Gaussian mean) or a sample."""
    with torch.no_grad():
        return agent.act(torch.as_tensor(obs, dtype=torch.float32, device=device), deterministic).cpu().numpy()


def evaluate(agent, env_id, episodes, seed, device="cpu", deterministic=True):
    """Undiscounted return of `episodes` episodes, one per environment, all run side by side."""
    envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="sync")
    space = envs.single_action_space
    obs, _ = envs.reset(seed=seed)
    returns, running = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while running.any():
        action = act(agent, obs, deterministic, device)
        if agent.continuous:
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * running  # each environment's first episode only
        running &= ~(terminated | truncated)
    envs.close()
    return returns


def record_gif(agent, env_id, path, seed, device="cpu", deterministic=True, scale=0.5, every=2):
    """One episode rendered to a GIF: frames downscaled by `scale`, one frame in `every` kept (small file)."""
    env = gym.make(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames, total, length, done = [], 0.0, 0, False
    while not done:
        if length % every == 0:
            frames.append(env.render())
        action = act(agent, obs[None], deterministic, device)[0]
        if agent.continuous:
            action = np.clip(action, env.action_space.low, env.action_space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, length = total + float(reward), length + 1
        done = terminated or truncated
    fps = env.metadata.get("render_fps", 30)
    env.close()
    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
        images.append(image.quantize(colors=32))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp.gif"
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 * every / fps), loop=0)
    os.replace(tmp, path)
    return total, length


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="runs/ppo/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the policy's mode")
    p.add_argument("--seed", type=int, default=12345, help="seed of the evaluation environments and of torch")
    p.add_argument("--gif", default=None,
                   help="GIF of one episode (default images/ppo_<env>.gif, e.g. ppo_cartpole.gif; '' for none)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    device = get_device(args.device)
    torch.manual_seed(args.seed)

    ckpt = load_checkpoint(args.checkpoint, device)
    agent = Agent(**ckpt["model_args"]).to(device)
    agent.load_state_dict(ckpt["model"])
    agent.eval()
    env_id = ckpt["config"]["env_id"]
    returns = evaluate(agent, env_id, args.episodes, args.seed, device, deterministic=not args.stochastic)
    kind = "stochastic" if args.stochastic else "deterministic"
    print(f"{env_id}: {kind} return over {args.episodes} episodes: {returns.mean():.1f} +- {returns.std():.1f} "
          f"(min {returns.min():.1f}, max {returns.max():.1f}; checkpoint at step {ckpt['step']})")
    gif = args.gif if args.gif is not None else str(IMAGES / f"ppo_{env_id.split('-')[0].lower()}.gif")
    if gif:
        total, length = record_gif(agent, env_id, gif, args.seed, device, deterministic=not args.stochastic)
        print(f"wrote {gif}: one episode, return {total:.1f}, {length} steps")
    return returns


if __name__ == "__main__":
    main()
