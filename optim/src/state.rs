//! Weights in the reference's order (`get_weights` / `set_weights`).

use crate::error::Error;
use crate::extensions::NonFinitePolicy;
use crate::optimizer::{LazyAdam, VarState};
use crate::store::Store;
use crate::tensor::{WeightData, WeightTensor};

fn ck(msg: impl Into<String>) -> Error {
    Error::Checkpoint(msg.into())
}

impl LazyAdam {
    /// The optimizer's weights in the reference's `get_weights()` order:
    /// `iterations` (an i64 scalar), every variable's `m`, every `v`, then
    /// (with `amsgrad`) every `vhat`, in registration order. Extensions with
    /// per-row state append every `<var>/row_steps`, then every
    /// `<var>/last_step` (i64 vectors, one value per row).
    pub fn get_weights(&self) -> Vec<WeightTensor> {
        let mut out = Vec::with_capacity(1 + 3 * self.vars.len());
        out.push(WeightTensor {
            name: "iterations".into(),
            shape: vec![],
            // At most i64::MAX: `set_iterations`, `set_weights` and loading
            // refuse more, and a step never goes past it.
            data: WeightData::I64(vec![self.iterations as i64]),
        });
        let slot = |v: &VarState, suffix: &str, s: &Store| WeightTensor {
            name: format!("{}/{suffix}", v.info.name),
            shape: v.info.shape.clone(),
            data: s.to_weight_data(),
        };
        out.extend(self.vars.iter().map(|v| slot(v, "m", &v.m)));
        out.extend(self.vars.iter().map(|v| slot(v, "v", &v.v)));
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.vhat.as_ref().map(|s| slot(v, "vhat", s))),
        );
        let counters = |v: &VarState, suffix: &str, c: &[u64]| WeightTensor {
            name: format!("{}/{suffix}", v.info.name),
            shape: vec![v.rows],
            // Per-row counters never exceed the step counter.
            data: WeightData::I64(c.iter().map(|&x| x as i64).collect()),
        };
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.row_steps.as_ref().map(|c| counters(v, "row_steps", c))),
        );
        out.extend(
            self.vars
                .iter()
                .filter_map(|v| v.last_step.as_ref().map(|c| counters(v, "last_step", c))),
        );
        out
    }

    /// Restores weights in the order of [`LazyAdam::get_weights`]. Shapes
    /// and storage types must match (names are not checked, as in Keras);
    /// on error nothing changes.
    pub fn set_weights(&mut self, weights: &[WeightTensor]) -> Result<(), Error> {
        let n = self.vars.len();
        let with_vhat = self.vars.iter().filter(|v| v.vhat.is_some()).count();
        let with_steps = self.vars.iter().filter(|v| v.row_steps.is_some()).count();
        let with_last = self.vars.iter().filter(|v| v.last_step.is_some()).count();
        let expected = 1 + 2 * n + with_vhat + with_steps + with_last;
        if weights.len() != expected {
            return Err(ck(format!(
                "expected {expected} weight tensors, got {}",
                weights.len()
            )));
        }
        let iterations = match &weights[0].data {
            WeightData::I64(v) if v.len() == 1 && v[0] >= 0 => v[0] as u64,
            _ => return Err(ck("weight 0 (iterations) must be one non-negative integer")),
        };
        let mut idx = 1;
        let mut take_slot = |var: &VarState, what: &str| -> Result<Store, Error> {
            let w = &weights[idx];
            idx += 1;
            let at = idx - 1;
            let slot = format!("{}/{what}", var.info.name);
            if w.shape != var.info.shape {
                return Err(ck(format!(
                    "weight {at} (`{}`) for {slot}: shape {:?}, expected {:?} (set_weights is \
                     positional, in registration order; to match variables by name use \
                     `restore_by_name`)",
                    w.name, w.shape, var.info.shape
                )));
            }
            if w.data.len() != var.numel {
                return Err(ck(format!(
                    "weight {at} (`{}`) for {slot}: {} values for shape {:?} ({} elements)",
                    w.name,
                    w.data.len(),
                    w.shape,
                    var.numel
                )));
            }
            match w.data.dtype() {
                Some(d) if d == var.info.moment_dtype => {}
                Some(d) => {
                    return Err(Error::DtypeMismatch {
                        variable: var.info.name.clone(),
                        what: "slot weight",
                        expected: var.info.moment_dtype,
                        got: d,
                    });
                }
                None => {
                    return Err(ck(format!(
                        "weight {at} (`{}`) for {slot}: integer (i64) data, expected {}",
                        w.name,
                        var.info.moment_dtype.name()
                    )));
                }
            }
            let store = Store::from_weight_data(&w.data)
                .ok_or_else(|| ck("internal: integer slot data"))?;
            if what != "m"
                && let Some((i, x)) = store.first_negative()
            {
                return Err(ck(format!(
                    "weight {at} (`{}`) for {slot}: element {i} is {x}, but a second moment is \
                     never negative",
                    w.name
                )));
            }
            Ok(store)
        };
        let mut ms = Vec::with_capacity(n);
        let mut vs = Vec::with_capacity(n);
        let mut vhats = Vec::with_capacity(n);
        for var in &self.vars {
            ms.push(take_slot(var, "m")?);
        }
        for var in &self.vars {
            vs.push(take_slot(var, "v")?);
        }
        for var in &self.vars {
            vhats.push(match var.vhat {
                Some(_) => Some(take_slot(var, "vhat")?),
                None => None,
            });
        }
        let mut take_counts = |var: &VarState, what: &str| -> Result<Vec<u64>, Error> {
            let w = &weights[idx];
            idx += 1;
            match &w.data {
                WeightData::I64(v)
                    if v.len() == var.rows
                        && v.iter().all(|&x| x >= 0 && x as u64 <= iterations) =>
                {
                    Ok(v.iter().map(|&x| x as u64).collect())
                }
                _ => Err(ck(format!(
                    "weight `{}` for {}/{what}: expected {} integers in 0..={iterations}",
                    w.name, var.info.name, var.rows
                ))),
            }
        };
        let mut steps = Vec::with_capacity(n);
        for var in &self.vars {
            steps.push(match var.row_steps {
                Some(_) => Some(take_counts(var, "row_steps")?),
                None => None,
            });
        }
        let mut lasts = Vec::with_capacity(n);
        for var in &self.vars {
            lasts.push(match var.last_step {
                Some(_) => Some(take_counts(var, "last_step")?),
                None => None,
            });
        }
        // Everything checked: commit.
        self.iterations = iterations;
        for (((((var, m), v), vh), s), l) in self
            .vars
            .iter_mut()
            .zip(ms)
            .zip(vs)
            .zip(vhats)
            .zip(steps)
            .zip(lasts)
        {
            var.m = m;
            var.v = v;
            if vh.is_some() {
                var.vhat = vh;
            }
            if s.is_some() {
                var.row_steps = s;
            }
            if l.is_some() {
                var.last_step = l;
            }
        }
        Ok(())
    }
}

impl LazyAdam {
    /// Restores the state of `saved` into this optimizer **by variable
    /// name**: the step counter, the loss scale, and for every variable its
    /// `m`, `v` (`vhat`) and per-row counters from the variable of the same
    /// name in `saved`. Hyperparameters, extensions and kernels stay this
    /// optimizer's own; a loss scale's count of good steps at or past this
    /// optimizer's growth interval (saved under a longer one) is restored as
    /// one below it, so that the next good step grows the scale, as it would
    /// from the saved count.
    ///
    /// Unlike the positional [`LazyAdam::set_weights`] (the reference's
    /// semantics), the registration order does not matter, so a model whose
    /// variables are registered in another order (a `HashMap` of parameters,
    /// another process) gets each variable's own moments back.
    ///
    /// Every variable of this optimizer must be in `saved` with the same
    /// shape and moment storage, `saved` must hold no other variable, and both
    /// must keep the same kinds of state (`vhat` with AMSGrad, the per-row
    /// counters of the extensions, a loss scale); otherwise
    /// [`Error::StateMismatch`] names the variable and nothing changes.
    ///
    /// ```
    /// use lazyadam::{DType, Gradient, LazyAdam, LazyAdamConfig, Update};
    /// let config = LazyAdamConfig::new(0.1);
    /// let mut a = LazyAdam::new(config.clone())?;
    /// let w = a.add_variable("w", &[2], DType::F32, DType::F32)?;
    /// let b = a.add_variable("b", &[2], DType::F32, DType::F32)?;
    /// let (mut pw, mut pb) = (vec![1.0f32, 2.0], vec![3.0f32, 4.0]);
    /// a.apply_gradients(&mut [
    ///     Update::new(w, &mut pw, Gradient::dense(&[0.5f32, 0.5])),
    ///     Update::new(b, &mut pb, Gradient::dense(&[-1.0f32, 1.0])),
    /// ])?;
    ///
    /// // Another process registers the variables in the other order.
    /// let mut resumed = LazyAdam::new(config)?;
    /// resumed.add_variable("b", &[2], DType::F32, DType::F32)?;
    /// resumed.add_variable("w", &[2], DType::F32, DType::F32)?;
    /// resumed.restore_from_bytes(&a.to_bytes()?)?;
    /// assert_eq!(resumed.iterations(), 1);
    /// let m_b = resumed.slots(resumed.variable_id("b").unwrap()).unwrap().m;
    /// assert_eq!(m_b.to_f32_vec(), a.slots(b).unwrap().m.to_f32_vec());
    ///
    /// // A variable the saved state does not have is an error naming it.
    /// let mut other = LazyAdam::new(LazyAdamConfig::new(0.1))?;
    /// for name in ["w", "b", "c"] {
    ///     other.add_variable(name, &[2], DType::F32, DType::F32)?;
    /// }
    /// let e = other.restore_by_name(&a).unwrap_err();
    /// assert!(e.to_string().contains("`c`"), "{e}");
    /// assert_eq!(other.iterations(), 0);
    /// # Ok::<(), lazyadam::Error>(())
    /// ```
    pub fn restore_by_name(&mut self, saved: &LazyAdam) -> Result<(), Error> {
        let mismatch = |variable: &str, reason: String| Error::StateMismatch {
            variable: variable.to_string(),
            reason,
        };
        for var in &saved.vars {
            if !self.names.contains_key(&var.info.name) {
                return Err(mismatch(
                    &var.info.name,
                    "the saved state has this variable but this optimizer does not \
                     (register it, or restore into an optimizer built for the saved model)"
                        .into(),
                ));
            }
        }
        let kind = |present: bool| if present { "keeps" } else { "does not keep" };
        let mut sources = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            let name = &var.info.name;
            let Some(&j) = saved.names.get(name) else {
                return Err(mismatch(
                    name,
                    "this optimizer has this variable but the saved state does not".into(),
                ));
            };
            let old = &saved.vars[j];
            if old.info.shape != var.info.shape {
                return Err(mismatch(
                    name,
                    format!(
                        "saved with shape {:?}, registered here with shape {:?}",
                        old.info.shape, var.info.shape
                    ),
                ));
            }
            if old.info.moment_dtype != var.info.moment_dtype {
                return Err(mismatch(
                    name,
                    format!(
                        "saved with {} moments, registered here with {} moments",
                        old.info.moment_dtype.name(),
                        var.info.moment_dtype.name()
                    ),
                ));
            }
            for (what, here, there) in [
                ("`vhat` (amsgrad)", var.vhat.is_some(), old.vhat.is_some()),
                (
                    "per-row step counters (per_row_bias_correction)",
                    var.row_steps.is_some(),
                    old.row_steps.is_some(),
                ),
                (
                    "per-row last-update steps (catch_up_decay)",
                    var.last_step.is_some(),
                    old.last_step.is_some(),
                ),
            ] {
                if here != there {
                    return Err(mismatch(
                        name,
                        format!(
                            "the saved state {} {what} and this optimizer {}",
                            kind(there),
                            kind(here)
                        ),
                    ));
                }
            }
            sources.push(j);
        }
        if self.loss_scale.is_some() != saved.loss_scale.is_some() {
            return Err(mismatch(
                "loss_scale",
                format!(
                    "the saved state {} a dynamic loss scale and this optimizer {}",
                    kind(saved.loss_scale.is_some()),
                    kind(self.loss_scale.is_some())
                ),
            ));
        }
        // Everything checked: copy (the clones are built before any write).
        let copies: Vec<_> = sources
            .iter()
            .map(|&j| {
                let old = &saved.vars[j];
                (
                    old.m.clone(),
                    old.v.clone(),
                    old.vhat.clone(),
                    old.row_steps.clone(),
                    old.last_step.clone(),
                )
            })
            .collect();
        for (var, (m, v, vhat, row_steps, last_step)) in self.vars.iter_mut().zip(copies) {
            var.m = m;
            var.v = v;
            var.vhat = vhat;
            var.row_steps = row_steps;
            var.last_step = last_step;
        }
        self.iterations = saved.iterations;
        // The growth interval is this optimizer's own: a count of good steps
        // at or past it (saved under a longer interval) is kept just below it.
        // The next good step grows the scale either way, and the state stays
        // one that a checkpoint holds (`from_bytes` refuses a count at or past
        // the interval).
        let interval = match &self.ext.non_finite {
            NonFinitePolicy::SkipStep {
                loss_scale: Some(cfg),
            } => Some(cfg.growth_interval),
            _ => None,
        };
        self.loss_scale = saved.loss_scale.map(|mut ls| {
            if let Some(i) = interval {
                ls.good_steps = ls.good_steps.min(i.saturating_sub(1));
            }
            ls
        });
        Ok(())
    }
}
