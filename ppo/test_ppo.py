"""PPO's claims, each checked against an independent reference: a plain loop, hand-computed values,
torch.distributions, gymnasium itself. Runs in well under 30 s on a 2-core CPU."""
import math
import os
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import sample
import train
from model import Agent, categorical_log_prob_entropy, gae, gaussian_log_prob_entropy, ppo_loss
from plumbing import parse_config

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = ["--steps", "512", "--num-envs", "4", "--num-steps", "64", "--update-epochs", "2",
        "--eval-episodes", "0", "--plot", ""]


def run_train(tmp_path, *flags):
    return train.main(FAST + ["--out-dir", str(tmp_path)] + list(flags))


def gae_reference(rewards, values, next_value, terminations, dones, gamma, lam):
    """Eq. 11 as the paper writes it: a forward sum of discounted TD errors to the episode's end."""
    T, N = len(rewards), len(rewards[0])
    adv = [[0.0] * N for _ in range(T)]
    for n in range(N):
        for t in range(T):
            total, k = 0.0, t
            while True:
                v_next = values[k + 1][n] if k + 1 < T else next_value[n]
                bootstrap = 0.0 if terminations[k][n] else gamma * v_next
                delta = rewards[k][n] + bootstrap - values[k][n]
                total += (gamma * lam) ** (k - t) * delta
                if dones[k][n] or k + 1 == T:
                    break
                k += 1
            adv[t][n] = total
    return adv


def test_gae_matches_python_loop_with_terminations_and_truncations():
    g = torch.Generator().manual_seed(0)
    T, N = 9, 3
    rewards, values = torch.rand(T, N, generator=g), torch.randn(T, N, generator=g)
    next_value = torch.randn(N, generator=g)
    terminations, truncations = torch.zeros(T, N), torch.zeros(T, N)
    terminations[2, 0] = terminations[7, 1] = 1  # terminal states: no bootstrap
    truncations[4, 0] = truncations[3, 2] = truncations[8, 2] = 1  # time limits: bootstrap
    dones = torch.maximum(terminations, truncations)
    advantages, returns = gae(rewards, values, next_value, terminations, dones, gamma=0.9,
                              gae_lambda=0.7)
    expected = gae_reference(rewards.tolist(), values.tolist(), next_value.tolist(),
                             terminations.tolist(), dones.tolist(), 0.9, 0.7)
    torch.testing.assert_close(advantages, torch.tensor(expected))
    torch.testing.assert_close(returns, advantages + values)


def test_gae_bootstraps_truncation_but_not_termination_by_hand():
    # one environment, 3 steps: a truncated episode (step 0), its autoreset step (1), a terminated
    # step (2).
    rewards, values = torch.tensor([[1.0], [0.0], [1.0]]), torch.tensor([[0.5], [2.0], [0.25]])
    terminations, dones = torch.tensor([[0.0], [0.0], [1.0]]), torch.tensor([[1.0], [0.0], [1.0]])
    adv, _ = gae(rewards, values, torch.tensor([9.0]), terminations, dones, gamma=0.5,
                 gae_lambda=1.0)
    # r + gamma V(s_final) - V(s), s_final = obs[1]
    assert adv[0, 0].item() == pytest.approx(1.0 + 0.5 * 2.0 - 0.5)
    assert adv[2, 0].item() == pytest.approx(1.0 - 0.25)  # terminal: r - V(s); next_value unused


def test_autoreset_step_is_marked_invalid_in_a_real_rollout():
    envs = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync")
    obs, _ = envs.reset(seed=0)
    torch.manual_seed(0)
    agent = Agent(4, 2, continuous=False)
    state = {"obs": obs, "prev_done": np.zeros(4, dtype=bool), "episode_return": np.zeros(4),
             "episode_length": np.zeros(4, dtype=np.int64)}
    b, episodes = train.rollout(envs, agent, state, num_steps=100, reward_scale=1.0, device="cpu")
    dones, valid = b["dones"], b["valid"]
    assert dones.sum() >= 8, "a random policy ends CartPole episodes within ~20 steps"
    np.testing.assert_array_equal(valid[1:], 1 - dones[:-1])  # the step after each episode end
    after = np.argwhere(dones[:-1] == 1)
    assert (b["rewards"][after[:, 0] + 1, after[:, 1]] == 0).all()  # gymnasium's reset step pays 0
    # the observation stored at the reset step is the episode's true final state (next-step
    # autoreset):
    final_obs = b["obs"][after[:, 0] + 1, after[:, 1]]
    terminated = b["terminations"][after[:, 0], after[:, 1]] == 1
    final_obs = final_obs[terminated]
    assert ((np.abs(final_obs[:, 0]) > 2.4) | (np.abs(final_obs[:, 2]) > 0.2095)).all()
    # every reward-1 step is counted once in the logged episodes (CartPole pays 1 per step)
    assert all(r == n for r, n in episodes) and len(episodes) == dones.sum()
    assert sum(n for _, n in episodes) + state["episode_length"].sum() == valid.sum()
    envs.close()


def fake_rollout(seed=0, T=16, N=3):
    rng = np.random.default_rng(seed)
    dones = (rng.random((T, N)) < 0.15).astype(np.float32)
    valid = np.ones((T, N), dtype=np.float32)
    valid[1:] = 1 - dones[:-1]
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    return {"obs": f32(rng.normal(size=(T, N, 4))), "actions": f32(rng.integers(0, 2, (T, N))),
            "log_probs": f32(np.full((T, N), math.log(0.5))),
            "values": f32(rng.normal(size=(T, N))), "rewards": f32(rng.random((T, N))),
            "terminations": dones, "dones": dones, "valid": valid,
            "next_value": f32(rng.normal(size=N))}


def update_result(b):
    torch.manual_seed(0)
    agent = Agent(4, 2, continuous=False)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    cfg = parse_config(train.Config, ["--update-epochs", "3", "--num-minibatches", "2"])
    train.ppo_update(agent, optimizer, b, cfg)
    return torch.cat([p.flatten() for p in agent.parameters()])


def test_autoreset_step_does_not_change_the_update():
    b = fake_rollout()
    boundary = b["valid"] == 0
    assert boundary.any()
    perturbed = {k: v.copy() for k, v in b.items()}
    perturbed["actions"][boundary] = 1 - perturbed["actions"][boundary]  # the ignored action
    perturbed["rewards"][boundary] += 100.0  # gymnasium pays 0 there; whatever it is cannot matter
    perturbed["log_probs"][boundary] = -5.0
    torch.testing.assert_close(update_result(b), update_result(perturbed), rtol=0, atol=0)
    control = {k: v.copy() for k, v in b.items()}
    control["rewards"][~boundary] += np.arange((~boundary).sum())  # a real step does matter
    assert not torch.equal(update_result(b), update_result(control))


def test_clipped_objective_matches_hand_computed_values():
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    new_log_prob = ratio.log().requires_grad_()
    zeros = torch.zeros(5)
    loss, stats = ppo_loss(new_log_prob, zeros, advantages, zeros, zeros, zeros, zeros,
                           clip_coef=0.2, vf_coef=0.0, ent_coef=0.0)
    # min(r A, clip(r, 0.8, 1.2) A) = [0.5, 1.0, 1.2, -0.8, -1.5] -> mean 0.08, Eq. 7
    assert stats["policy_loss"] == pytest.approx(-0.08)
    assert stats["clip_frac"] == pytest.approx(0.8)
    loss.backward()
    # the clipped branch is active for r=1.5, A>0 and r=0.5, A<0: no gradient there (no incentive
    # to move r further)
    grad = new_log_prob.grad
    assert grad[2] == 0 and grad[3] == 0
    # d(-r A / 5) / d log r
    torch.testing.assert_close(grad[[0, 1, 4]], -torch.tensor([0.5, 1.0, -1.5]) / 5)


def test_value_loss_and_entropy_terms_by_hand():
    new_value, old_value = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.9])
    returns = torch.tensor([2.0, 2.0])
    zeros, entropy = torch.zeros(2), torch.tensor([0.5, 0.7])
    _, stats = ppo_loss(zeros, zeros, zeros, new_value, old_value, returns, entropy, clip_coef=0.2)
    assert stats["value_loss"] == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    loss, stats = ppo_loss(zeros, zeros, zeros, new_value, old_value, returns, entropy,
                           clip_coef=0.2, vf_coef=0.5, ent_coef=0.1, clip_vloss=True)
    # clipped: V0 -> 0.2 (error 1.8^2 = 3.24 > 1), V1 = 3.0 within 0.2 of 2.9 -> max(1, 1) = 1
    assert stats["value_loss"] == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert loss.item() == pytest.approx(0.5 * stats["value_loss"] - 0.1 * 0.6)


def test_log_probs_and_entropies_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits, actions = torch.randn(64, 5, generator=g) * 3, torch.randint(0, 5, (64,), generator=g)
    log_prob, entropy = categorical_log_prob_entropy(logits, actions)
    reference = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(log_prob, reference.log_prob(actions))
    torch.testing.assert_close(entropy, reference.entropy())
    mean, log_std = torch.randn(64, 3, generator=g), torch.randn(3, generator=g)
    actions = torch.randn(64, 3, generator=g)
    log_prob, entropy = gaussian_log_prob_entropy(mean, log_std, actions)
    reference = torch.distributions.Normal(mean, log_std.exp())
    torch.testing.assert_close(log_prob, reference.log_prob(actions).sum(-1))
    torch.testing.assert_close(entropy, reference.entropy().sum(-1))


def test_agent_samples_follow_its_own_log_probs():
    torch.manual_seed(0)
    agent = Agent(3, 2, continuous=True, init_log_std=-1.0)
    obs = torch.randn(1, 3).expand(20000, 3)
    with torch.no_grad():
        action, mode = agent.act(obs), agent.act(obs[:1], deterministic=True)
        log_prob, _, _ = agent.evaluate_actions(obs, action)
    torch.testing.assert_close(action.mean(0), mode[0], atol=0.01, rtol=0)
    torch.testing.assert_close(action.std(0), torch.full((2,), math.exp(-1.0)), atol=0.01, rtol=0)
    reference = torch.distributions.Normal(mode, math.exp(-1.0))
    torch.testing.assert_close(log_prob, reference.log_prob(action).sum(-1))
    agent = Agent(3, 4, continuous=False)
    torch.nn.init.normal_(agent.actor[-1].weight, std=1.0)  # a policy far from uniform
    with torch.no_grad():
        action, mode = agent.act(obs), agent.act(obs[:1], deterministic=True)
        log_prob, _, _ = agent.evaluate_actions(obs[:4], torch.arange(4))  # all actions in state s
    frequencies = torch.bincount(action, minlength=4) / len(action)
    torch.testing.assert_close(frequencies, log_prob.exp(), atol=0.01, rtol=0)  # samples follow pi
    assert mode.item() == log_prob.argmax().item()


def test_running_observation_statistics_match_numpy():
    agent = Agent(2, 1, continuous=True, norm_obs=True)
    batches = [torch.randn(n, 2) * 3 + 1 for n in (5, 17, 1, 40)]
    for batch in batches:
        agent.update_obs_stats(batch)
    everything = torch.cat(batches).numpy()
    np.testing.assert_allclose(agent.obs_mean.numpy(), everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(agent.obs_var.numpy(), everything.var(0), rtol=1e-4)
    normalized = agent.normalize(torch.as_tensor(everything)).numpy()
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(0), 1, atol=1e-4)


def test_training_beats_a_random_policy(tmp_path):
    _, returns = train.main(["--steps", "10240", "--eval-episodes", "20", "--out-dir",
                             str(tmp_path), "--seed", "1"])  # 40 iterations of the default config
    random_policy_return = 22.0  # CartPole-v1 with uniform random actions
    assert returns.mean() > 3 * random_policy_return
    episodes = (tmp_path / "episodes.csv").read_text().splitlines()
    assert len(episodes) > 50, "episodic returns must be logged under gymnasium 1.x"
    assert (tmp_path / "ppo_learning_curve.png").stat().st_size > 1000  # in --out-dir, not images/


def test_same_seed_same_run(tmp_path):
    a, _ = run_train(tmp_path / "a", "--seed", "3")
    b, _ = run_train(tmp_path / "b", "--seed", "3")
    c, _ = run_train(tmp_path / "c", "--seed", "4")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.actor[0].weight, c.actor[0].weight)


def test_resume_continues_exactly(tmp_path):
    flags = ["--no-anneal-lr", "--num-steps", "24"]  # 24: episodes in flight at each checkpoint
    straight, _ = run_train(tmp_path / "straight", *flags, "--steps", str(4 * 4 * 24))
    run_train(tmp_path / "split", *flags, "--steps", str(2 * 4 * 24))
    resumed, _ = train.main(["--resume", str(tmp_path / "split" / "ckpt.pt"), "--steps",
                             str(4 * 4 * 24), "--out-dir", str(tmp_path / "split"), "--plot", "",
                             "--eval-episodes", "0"])
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # header, then one row per iteration across both runs


def test_checkpoint_then_sample_on_continuous_env(tmp_path):
    run_train(tmp_path, "--env-id", "Pendulum-v1", "--norm-obs", "--init-log-std", "-0.5")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["folder"] == "ppo" and ckpt["step"] == 512 and ckpt["model_args"]["continuous"]
    assert ckpt["model"]["obs_count"].item() == 512  # observation statistics travel with the model
    pictures = tmp_path / "pictures"
    returns = sample.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--episodes", "3",
                           "--out-dir", str(pictures)])
    gif = pictures / "ppo_pendulum.gif"
    assert os.listdir(pictures) == ["ppo_pendulum.gif"]  # sample.py writes only into --out-dir
    assert returns.shape == (3,) and (returns < 0).all()  # Pendulum's rewards are costs
    assert 0 < gif.stat().st_size < 500_000


def one_line_error(capsys, main, argv):
    """The message of a user error: sys.exit("error: ...") or parser.error (exit 2), one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    text = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "\n" not in text and "Traceback" not in text
    return text


def test_user_errors_are_one_line(tmp_path, capsys):
    cases = [(train.main, ["--env-id", "NoSuchEnv-v0"], "unknown --env-id"),
             (train.main, ["--init-log-std", "-1"], "continuous actions"),
             (train.main, ["--num-envs", "0"], "--num-envs must be at least 1"),
             (train.main, ["--steps", "100"], "less than one rollout"),
             (sample.main, ["--checkpoint", str(tmp_path / "missing.pt")], "not found")]
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    torch.save({"folder": "gpt", "model": {}}, tmp_path / "gpt.pt")
    resume_gpt = ["--resume", str(tmp_path / "gpt.pt"), "--out-dir", str(tmp_path / "r")]
    cases += [(sample.main, ["--checkpoint", str(tmp_path / "gpt.pt")], "not written by ppo/"),
              (train.main, resume_gpt, "not written by ppo/")]
    for main, argv, message in cases:
        assert message in one_line_error(capsys, main, argv), argv
    assert not (tmp_path / "r").exists(), "a failed resume must leave nothing behind"
    message = one_line_error(capsys, sample.main, ["--checkpoint", str(tmp_path / "corrupt.pt")])
    assert "truncated or corrupt" in message


@pytest.mark.parametrize("lr", ["nan", "inf", "-1"])
def test_bad_learning_rate_stops_before_training(tmp_path, capsys, lr):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--lr", lr, "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2  # parser.error: usage and one line, no optimiser traceback
    assert "--lr" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    message = one_line_error(capsys, train.main, FAST + ["--out-dir", str(tmp_path / "taken")])
    assert "is a file" in message


class NotPlainData:
    """An object weights_only=True refuses to unpickle (it could run code)."""


def test_bad_checkpoints_say_what_is_wrong(tmp_path, capsys):
    run_train(tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    del ckpt["model"]
    torch.save(ckpt, tmp_path / "no_model.pt")
    torch.save({"folder": "ppo", "x": NotPlainData(), "model": {}}, tmp_path / "unsafe.pt")
    for path, words in [(tmp_path / "no_model.pt", "lacks the key(s) 'model'"),
                        (tmp_path / "unsafe.pt", "not allowed to load"),
                        (tmp_path / "run", "is a folder")]:
        assert words in one_line_error(capsys, sample.main, ["--checkpoint", str(path)])
        resume = ["--resume", str(path), "--out-dir", str(tmp_path / "resumed")]
        assert words in one_line_error(capsys, train.main, resume)
    assert not (tmp_path / "resumed").exists()


class StopAfter(train.Clock):
    """A wall clock that runs out after `checks` checks (as --max-minutes or Ctrl-C would)."""
    checks = 2

    def done(self):
        self.checks -= 1
        return self.checks < 0 or super().done()


def test_max_minutes_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight, _ = run_train(tmp_path / "straight", "--steps", "1024")
    monkeypatch.setattr(train, "Clock", StopAfter)
    stopped, returns = run_train(tmp_path / "split", "--steps", "1024", "--eval-episodes", "5")
    assert len(returns) == 0  # no time left for the evaluation
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 2 * 256
    assert "stopped early" in capsys.readouterr().out
    monkeypatch.undo()
    resumed, _ = train.main(["--resume", str(tmp_path / "split" / "ckpt.pt"), "--out-dir",
                             str(tmp_path / "split"), "--steps", "1024", "--eval-episodes", "0"])
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    assert len((tmp_path / "split" / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_max_minutes_bounds_the_whole_run(tmp_path):
    start = time.perf_counter()
    train.main(FAST + ["--steps", "10000000", "--out-dir", str(tmp_path), "--max-minutes",
                       str(0.5 / 60), "--eval-episodes", "100"])
    assert time.perf_counter() - start < 5  # half a second of budget, then checkpoint and plot
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] < 10000000


def test_command_line_errors_have_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--env-id", "CartPole-v0x", "--out-dir",
                             str(tmp_path)], cwd=HERE, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown --env-id" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ the shipped policy
def test_shipped_policy_balances_cartpole():
    """pretrained/cartpole.pt, as `python ppo/sample.py` loads it: measured 500.0 (the time limit)
    in each of these 10 deterministic episodes (seed 12345, as in all 100 of sample.py's default);
    the test asks for a mean of at least 475, CartPole-v1's "solved" threshold, and no episode
    longer than the limit (an evaluation that ran past a truncation would score more)."""
    returns = sample.main(["--episodes", "10", "--no-gif"])
    assert returns.shape == (10,)
    assert returns.mean() >= 475 and returns.max() <= 500, returns


def test_a_corrupted_shipped_policy_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    shipped = os.path.join(HERE, "pretrained")
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "manifest.json").write_bytes(open(os.path.join(shipped, "manifest.json"),
                                                    "rb").read())
    data = bytearray(open(os.path.join(shipped, "cartpole.pt"), "rb").read())
    data[len(data) // 2] ^= 1  # one bit flipped
    (pretrained / "cartpole.pt").write_bytes(bytes(data))
    monkeypatch.setitem(sample.load_checkpoint.__globals__, "PRETRAINED", pretrained)
    message = one_line_error(capsys, sample.main, ["--episodes", "1", "--no-gif"])
    assert "does not match its recorded sha256" in message
