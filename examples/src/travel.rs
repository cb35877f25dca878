//! The travel saga: book a flight, a hotel and a car at once (a parallel group, each cancelled
//! if the trip is not booked), then confirm (the pivot).

use saga_core::{SagaDefinition, StepContext};
use serde::{Deserialize, Serialize};

use crate::order::{retry, step_timeout};
use crate::{CommandSpec, Example, Receipt};

/// A trip to book.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// The trip number.
    pub trip_no: u64,
    /// Where to.
    pub destination: String,
    /// How many nights.
    pub nights: u32,
    /// No car is left at the destination: the saga compensates.
    #[serde(default)]
    pub no_cars: bool,
}

/// What each travel command receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Booking {
    /// The trip number.
    pub trip_no: u64,
    /// Where to.
    pub destination: String,
    /// The receipt of the booking this command cancels, if any.
    pub receipt: Option<Receipt>,
    /// Whether no car is left.
    pub no_cars: bool,
}

/// The travel saga.
#[derive(Debug, Clone, Copy)]
pub struct TravelSaga;

fn booking(
    step: Option<&'static str>,
) -> impl Fn(&StepContext<'_, Trip>) -> Result<Booking, saga_core::InputError> + Send + Sync + 'static
{
    move |ctx| {
        let t = ctx.input();
        Ok(Booking {
            trip_no: t.trip_no,
            destination: t.destination.clone(),
            receipt: match step {
                Some(step) => ctx.try_output(step)?,
                None => None,
            },
            no_cars: t.no_cars,
        })
    }
}

/// The flight, hotel and car steps: (name, service, command, compensation).
const BOOKINGS: [(&str, &str, &str, &str); 3] = [
    ("flight", "flights", "book_flight", "cancel_flight"),
    ("hotel", "hotels", "book_hotel", "cancel_hotel"),
    ("car", "cars", "rent_car", "cancel_car"),
];

/// The travel saga: `travel` v2, flight, hotel and car as the parallel group `book`; or, not
/// `grouped`, `travel` v1, the same steps one after another (the version before the group,
/// still registered so that its sagas end, and the bench's comparison).
fn definition(grouped: bool) -> SagaDefinition<Trip> {
    let step = |step: &'static str, service: &'static str, book, cancel| {
        move |s: saga_core::StepBuilder<Trip>| {
            s.action(service, book, booking(None))
                .compensation(service, cancel, booking(Some(step)))
                .retry(retry())
                .timeout(step_timeout())
        }
    };
    let b = if grouped {
        SagaDefinition::<Trip>::builder("travel", 2).parallel("book", |mut g| {
            for (name, service, book, cancel) in BOOKINGS {
                g = g.step(name, step(name, service, book, cancel));
            }
            g
        })
    } else {
        let mut b = SagaDefinition::<Trip>::builder("travel", 1);
        for (name, service, book, cancel) in BOOKINGS {
            b = b.step(name, step(name, service, book, cancel));
        }
        b
    };
    b.step("confirm", |s| {
        s.pivot()
            .action("booking", "confirm", booking(None))
            .retry(retry())
            .timeout(step_timeout())
    })
    .build()
    .expect("the travel saga is valid")
}

impl Example for TravelSaga {
    type Input = Trip;

    const PROGRAM: &'static str = "travel-saga";

    const COMMANDS: &'static [CommandSpec] = &[
        CommandSpec {
            service: "flights",
            command: "book_flight",
            fails_when: None,
        },
        CommandSpec {
            service: "flights",
            command: "cancel_flight",
            fails_when: None,
        },
        CommandSpec {
            service: "hotels",
            command: "book_hotel",
            fails_when: None,
        },
        CommandSpec {
            service: "hotels",
            command: "cancel_hotel",
            fails_when: None,
        },
        CommandSpec {
            service: "cars",
            command: "rent_car",
            fails_when: Some("no_cars"),
        },
        CommandSpec {
            service: "cars",
            command: "cancel_car",
            fails_when: None,
        },
        CommandSpec {
            service: "booking",
            command: "confirm",
            fails_when: None,
        },
    ];

    fn definition() -> SagaDefinition<Trip> {
        definition(true)
    }

    fn sequential() -> Option<SagaDefinition<Trip>> {
        Some(definition(false))
    }

    fn previous() -> Vec<SagaDefinition<Trip>> {
        vec![definition(false)]
    }

    fn input(n: u64, fail: bool) -> Trip {
        const PLACES: [&str; 4] = ["Lisbon", "Kyoto", "Oaxaca", "Tromsø"];
        Trip {
            trip_no: n,
            destination: PLACES[(n % 4) as usize].to_owned(),
            nights: 2 + (n % 5) as u32,
            no_cars: fail,
        }
    }
}
