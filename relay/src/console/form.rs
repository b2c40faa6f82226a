//! The console's forms, pure: `application/x-www-form-urlencoded` bodies parsed within bounds,
//! and the creation form checked field by field with the label files' own rules
//! (`label_source::{check_id, normalize_label}`, the CRD's ranges), so each error can be shown
//! beside its field.

use std::collections::BTreeMap;

use percent_encoding::percent_decode_str;
use taas_crds::limits::{MAX_PARKED_MAX, MAX_PARKED_MIN, PERIOD_MAX, PERIOD_MIN};

use crate::config::Algorithm;
use crate::label_source::{check_id, normalize_label};
use crate::provision::SpecOptions;

/// Most fields in one form.
pub const MAX_FIELDS: usize = 32;
/// Longest value of one field (bytes, decoded).
pub const MAX_VALUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the form is not UTF-8 text")]
    NotText,
    #[error("the form has more than {MAX_FIELDS} fields")]
    TooManyFields,
    #[error("a form field is longer than {MAX_VALUE} bytes")]
    TooLong,
}

/// The fields of a urlencoded body, in order (a repeated name keeps its first value).
pub fn parse(body: &[u8]) -> Result<BTreeMap<String, String>, FormError> {
    let text = std::str::from_utf8(body).map_err(|_| FormError::NotText)?;
    let mut fields = BTreeMap::new();
    let decode = |s: &str| -> Result<String, FormError> {
        let plus = s.replace('+', " ");
        let value = percent_decode_str(&plus)
            .decode_utf8()
            .map_err(|_| FormError::NotText)?
            .into_owned();
        if value.len() > MAX_VALUE {
            return Err(FormError::TooLong);
        }
        Ok(value)
    };
    for (n, pair) in text.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n >= MAX_FIELDS {
            return Err(FormError::TooManyFields);
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (decode(name)?, decode(value)?);
        fields.entry(name).or_insert(value);
    }
    Ok(fields)
}

/// The creation form as typed (so it can be shown again with its errors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateForm {
    pub id: String,
    pub label: String,
    pub algorithm: String,
    pub period: String,
    pub max_parked: String,
    pub direct: bool,
    pub source_pinning: bool,
    pub steward: bool,
}

impl Default for CreateForm {
    /// An empty form with the label files' defaults.
    fn default() -> Self {
        let defaults = SpecOptions::default();
        Self {
            id: String::new(),
            label: String::new(),
            algorithm: "SHA1".into(),
            period: defaults.period.to_string(),
            max_parked: defaults.max_parked.to_string(),
            direct: false,
            source_pinning: defaults.source_pinning,
            steward: false,
        }
    }
}

/// A checked creation form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLabelForm {
    pub id: String,
    /// Lower case.
    pub label: String,
    pub direct: bool,
    pub options: SpecOptions,
    /// Also make the original steward's provisioning file.
    pub steward: bool,
}

/// Field name → what is wrong with it.
pub type FieldErrors = BTreeMap<&'static str, String>;

impl CreateForm {
    /// From the posted fields. Checkboxes are on when present (browsers send only checked
    /// ones); `source_pinning` comes with a hidden `source_pinning_shown` so that unticking
    /// it is told apart from an old form without the box.
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Self {
        let text = |name: &str| fields.get(name).map(|v| v.trim().to_string());
        let on = |name: &str| fields.contains_key(name);
        let defaults = Self::default();
        Self {
            id: text("id").unwrap_or_default(),
            label: text("label").unwrap_or_default(),
            algorithm: text("algorithm").unwrap_or(defaults.algorithm),
            period: text("period").unwrap_or(defaults.period),
            max_parked: text("max_parked").unwrap_or(defaults.max_parked),
            direct: on("direct"),
            source_pinning: on("source_pinning") || !on("source_pinning_shown"),
            steward: on("steward"),
        }
    }

    /// Checks every field; all problems at once, each under its field's name.
    pub fn validate(&self) -> Result<NewLabelForm, FieldErrors> {
        let mut errors = FieldErrors::new();
        if self.id.is_empty() {
            errors.insert(
                "id",
                "an ID is required (the hidden server's TOTP username)".into(),
            );
        } else if let Err(e) = check_id(&self.id) {
            errors.insert("id", e.to_string());
        }
        let label = if self.label.is_empty() {
            errors.insert(
                "label",
                "a LABEL is required (clients ask for LABEL.<domain>)".into(),
            );
            String::new()
        } else {
            normalize_label(&self.label).unwrap_or_else(|e| {
                errors.insert("label", e);
                String::new()
            })
        };
        let algorithm = match self.algorithm.to_ascii_uppercase().as_str() {
            "SHA1" => Algorithm::SHA1,
            "SHA256" => Algorithm::SHA256,
            "SHA512" => Algorithm::SHA512,
            _ => {
                errors.insert("algorithm", "choose SHA1, SHA256 or SHA512".into());
                Algorithm::SHA1
            }
        };
        let mut number =
            |field: &'static str, value: &str, lo: u32, hi: u32, what: &str| match value
                .parse::<u32>()
            {
                Ok(n) if (lo..=hi).contains(&n) => n,
                _ => {
                    errors.insert(field, format!("{what}: a whole number from {lo} to {hi}"));
                    lo
                }
            };
        let period = number(
            "period",
            &self.period,
            PERIOD_MIN,
            PERIOD_MAX,
            "the TOTP step in seconds",
        );
        let max_parked = number(
            "max_parked",
            &self.max_parked,
            MAX_PARKED_MIN,
            MAX_PARKED_MAX,
            "parked connections at once",
        );
        if self.steward && (algorithm != Algorithm::SHA1 || period != 30) {
            errors.insert(
                "steward",
                "the original steward speaks HMAC-SHA1 with a 30 s step only".into(),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(NewLabelForm {
            id: self.id.clone(),
            label,
            direct: self.direct,
            options: SpecOptions {
                algorithm,
                period,
                max_parked,
                source_pinning: self.source_pinning,
            },
            steward: self.steward,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn form(body: &str) -> CreateForm {
        CreateForm::from_fields(&parse(body.as_bytes()).unwrap())
    }

    #[test]
    fn a_urlencoded_body_is_decoded() {
        let fields = parse(b"id=a%2Fb+c&label=Home&direct=on&id=second&empty=&bare").unwrap();
        assert_eq!(fields["id"], "a/b c");
        assert_eq!(fields["label"], "Home");
        assert_eq!(fields["empty"], "");
        assert_eq!(fields["bare"], "");
        assert_eq!(parse(&[0xff]), Err(FormError::NotText));
        assert_eq!(parse(b"a=%ff"), Err(FormError::NotText));
        let many = vec!["a=1"; MAX_FIELDS + 1].join("&");
        assert_eq!(parse(many.as_bytes()), Err(FormError::TooManyFields));
        let long = format!("a={}", "x".repeat(MAX_VALUE + 1));
        assert_eq!(parse(long.as_bytes()), Err(FormError::TooLong));
    }

    #[test]
    fn a_good_form_gives_the_label_and_its_options() {
        let f = form("id=srv-1&label=Home.Office&algorithm=sha256&period=60&max_parked=4&direct=on&source_pinning_shown=1");
        let valid = f.validate().unwrap();
        assert_eq!(valid.label, "home.office");
        assert_eq!(valid.options.algorithm, Algorithm::SHA256);
        assert_eq!((valid.options.period, valid.options.max_parked), (60, 4));
        assert!(valid.direct && !valid.options.source_pinning && !valid.steward);
        // Fields left out take the defaults.
        let valid = form("id=x&label=y").validate().unwrap();
        assert_eq!(valid.options, SpecOptions::default());
    }

    #[test]
    fn every_bad_field_gets_its_own_error() {
        let errors = form("id=a b&label=a..b&algorithm=MD5&period=0&max_parked=x")
            .validate()
            .unwrap_err();
        assert_eq!(
            errors.keys().copied().collect::<Vec<_>>(),
            ["algorithm", "id", "label", "max_parked", "period"]
        );
        let errors = form("").validate().unwrap_err();
        assert!(errors["id"].contains("required") && errors["label"].contains("required"));
        let errors = form("id=x&label=y&algorithm=SHA512&steward=on")
            .validate()
            .unwrap_err();
        assert!(errors["steward"].contains("SHA1"));
    }

    proptest! {
        #[test]
        fn no_body_makes_parsing_or_checking_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(fields) = parse(&body) {
                let _ = CreateForm::from_fields(&fields).validate();
            }
        }

        #[test]
        fn no_field_text_makes_checking_panic(id in ".{0,80}", label in ".{0,80}", period in ".{0,12}") {
            let f = CreateForm { id, label, period, ..CreateForm::default() };
            if let Ok(valid) = f.validate() {
                prop_assert!(normalize_label(&valid.label).is_ok());
            }
        }
    }
}
